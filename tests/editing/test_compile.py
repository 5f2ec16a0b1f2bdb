"""``--compile``: the controlled UNet compiles once per padded batch shape and method, with the editing
processors and hooks inside one graph (no graph break), and edits as eager does.

Dynamo is driven with a counting backend (it records each graph dynamo hands over and runs it as
captured): what is proven here is dynamo's side (graph breaks, recompiles, plan tensors read fresh per
chunk, not baked in); inductor's code generation is exercised by ``python -m benchmarks.gpu --smoke``.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from editing.batching import padded_rows
from editing.configs import P2PConfig, PnPConfig
from editing.inversion import invert_many
from editing.methods import ChunkDone, SourceGroup, Target, edit
from editing.model import compile_unet, load_model

from .conftest import make_image

STEPS = 4  # the PnP/P2P schedules still switch rows on and off within the run (0.5 and 0.8 of it)


class CountingBackend:
    """A dynamo backend that keeps every graph it is given and runs it as captured."""

    def __init__(self) -> None:
        self.graphs: list[int] = []  # node count of each compiled graph

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        self.graphs.append(len(gm.graph.nodes))
        return gm.forward


def _groups(invs) -> list[SourceGroup]:
    """Per source two PnP and two P2P targets whose settings differ from source to source, so that every
    chunk's plan differs in value (which rows act at which step) but not in shape."""
    return [
        SourceGroup(
            inv,
            [
                Target("a photo of a dog", PnPConfig(feature_t=0.5 + 0.25 * (i % 2))),
                Target("a photo of a red cat", PnPConfig(attn_t=0.25 * (i + 1))),
                Target("a photo of a dog", P2PConfig(cross_replace_steps=0.25 * (i + 1))),
                Target("a photo of a big cat", P2PConfig(self_replace_steps=0.25 * i)),
            ],
        )
        for i, inv in enumerate(invs)
    ]


def test_compiled_unet_no_graph_breaks_no_recompiles_and_equal_to_eager(tiny_dir):
    model = load_model(
        tiny_dir
    )  # fp32, its own UNet: compiling in place must not touch other tests'
    images = [make_image(10 + i) for i in range(3)]
    invs = invert_many(model, images, ["a photo of a cat"] * 3, num_steps=STEPS)
    groups = _groups(invs)
    eager = edit(model, groups, max_batch=2, pad=True, isolate_failures=False)

    backend = CountingBackend()
    torch._dynamo.reset()
    counters.clear()
    compile_unet(model, "default", backend=backend)
    chunks: list[ChunkDone] = []
    try:
        # no pad=: a compiled UNet's chunks are padded to fixed shapes by default
        compiled = edit(model, groups, max_batch=2, isolate_failures=False, on_chunk=chunks.append)
    finally:
        torch._dynamo.reset()
    # 3 chunks of 2 targets (a source row and 4 target rows, padded to 8) per method
    assert [(c.method, c.targets) for c in chunks] == [("pnp", 2), ("p2p", 2)] * 3
    shapes = {(c.method, padded_rows(2 * c.targets + 1)) for c in chunks}
    assert shapes == {("pnp", 8), ("p2p", 8)}
    assert all(c.padding_evals == 3 * STEPS for c in chunks)  # 3 padding rows at every step
    assert not counters["graph_break"], dict(counters["graph_break"])
    # one graph per (method, padded shape): not per step (STEPS x 6 calls), not per chunk
    assert len(backend.graphs) == len(shapes), backend.graphs
    assert counters["frames"]["ok"] == len(shapes)
    for group_eager, group_compiled in zip(eager, compiled):
        for a, b in zip(group_eager, group_compiled):
            rel = (a.latent - b.latent).norm() / a.latent.norm()
            assert rel <= 1e-4, (a.method, a.prompt, float(rel))


def test_reduce_overhead_off_cuda_falls_back_to_default_with_one_line(tiny_dir, caplog):
    model = load_model(tiny_dir)
    with caplog.at_level(logging.WARNING, logger="editing.model"):
        mode = compile_unet(model, "reduce-overhead", backend=CountingBackend())
    assert mode == "default"
    lines = [r.getMessage() for r in caplog.records if r.name == "editing.model"]
    assert len(lines) == 1 and "needs a CUDA device" in lines[0] and "'default'" in lines[0]
    assert compile_unet(load_model(tiny_dir), "off") == "off"
    with pytest.raises(ValueError, match="compile must be one of .* got 'fast'"):
        compile_unet(model, "fast")
    torch._dynamo.reset()


def test_the_run_option_reaches_the_worker_model(tiny_dir):
    """--compile -> RunOptions.compile -> tasks.worker.get_model: a compiled UNet, kept apart from the
    eager model of the same settings."""
    from tasks.options import RunOptions
    from tasks.worker import get_model

    options = RunOptions(out="unused", model=str(tiny_dir), compile="max-autotune")
    with pytest.raises(ValueError, match="compile must be one of"):
        RunOptions(out="unused", compile="fast")
    args = {k: v for k, v in options.model_args().items() if k != "config"}
    compiled = get_model(options.model_ref, device="cpu", dtype="float32", **args)
    eager = get_model(
        options.model_ref, device="cpu", dtype="float32", **(args | {"compile": "off"})
    )
    assert compiled is not eager
    assert compiled.unet._compiled_call_impl is not None and eager.unet._compiled_call_impl is None
