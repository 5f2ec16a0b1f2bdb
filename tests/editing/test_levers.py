"""The GPU levers as switches (README: GPU levers), checked on CPU with the tiny fp64 model: each changes
how the work is run (kernels, call sizes, batch shapes), never what it computes."""

from __future__ import annotations

import dataclasses

import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from editing import attention
from editing.configs import PnPConfig
from editing.inversion import invert_many
from editing.methods import SourceGroup, Target, edit
from editing.model import set_channels_last

from .conftest import make_image

TARGETS = [Target(f"a photo of a {w}", PnPConfig()) for w in ("dog", "red cat", "big cat")]


def _latents(results) -> torch.Tensor:
    return torch.stack([r.latent for r in results])


def test_sdpa_off_runs_the_plain_layers_unfused_with_the_same_edit(
    tiny, cat_inversion, monkeypatch
):
    seen = []
    real = attention.controlled_unet

    def spy(unet, state, **kw):
        seen.append(kw.get("sdpa", True))
        return real(unet, state, **kw)

    def plain_types(model) -> set[type]:
        types = set()

        def record(module, args, kwargs):
            types.add(type(module.processor))

        handles = [
            m.register_forward_pre_hook(record, with_kwargs=True)
            for n, m in model.unet.named_modules()
            if n == "down_blocks.0.attentions.0.transformer_blocks.0.attn1"  # never PnP-controlled
        ]
        try:
            return _latents(edit(model, [SourceGroup(cat_inversion, TARGETS[:1])])[0]), types
        finally:
            for h in handles:
                h.remove()

    monkeypatch.setattr("editing.pnp.controlled_unet", spy)
    fused, fused_types = plain_types(tiny)
    unfused, unfused_types = plain_types(dataclasses.replace(tiny, sdpa=False))
    assert seen == [True, False]
    assert fused_types == {AttnProcessor2_0} and unfused_types == {AttnProcessor}
    torch.testing.assert_close(unfused, fused, rtol=1e-9, atol=1e-9)


def test_decode_per_chunk_is_one_vae_call_with_the_same_images(tiny, cat_inversion):
    calls = []
    handle = tiny.vae.decoder.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    try:
        group = [SourceGroup(cat_inversion, TARGETS)]
        per_image = edit(dataclasses.replace(tiny, decode_batch=1), group)[0]
        n = len(calls)
        per_chunk = edit(dataclasses.replace(tiny, decode_batch=0), group)[0]
    finally:
        handle.remove()
    assert calls[:n] == [1, 1, 1] and calls[n:] == [3]
    for a, b in zip(per_image, per_chunk):
        diff = (torch.tensor(a.image.getdata()) - torch.tensor(b.image.getdata())).abs()
        assert int(diff.max()) <= 1  # rounding to 8 bits may flip a last digit


def test_channels_last_switch_keeps_the_edit(tiny, cat_inversion):
    group = [SourceGroup(cat_inversion, TARGETS[:1])]
    plain = _latents(edit(tiny, group)[0])
    set_channels_last(tiny, True)
    try:
        assert tiny.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        fast = _latents(edit(tiny, group)[0])
    finally:
        set_channels_last(tiny, False)
    assert tiny.unet.conv_in.weight.is_contiguous()
    torch.testing.assert_close(fast, plain, rtol=1e-9, atol=1e-9)


def test_padded_inversion_runs_fixed_shapes_and_gives_the_same_trajectories(tiny):
    images, prompts = [make_image(i) for i in range(3)], ["a photo of a cat"] * 3
    rows = []
    handle = tiny.unet.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))
    try:
        plain = invert_many(tiny, images, prompts, num_steps=2)
        n = len(rows)
        padded = invert_many(tiny, images, prompts, num_steps=2, pad=True)
    finally:
        handle.remove()
    # 3 sources: inversion calls of 3 rows and guided calls of 6, padded to 4 and 8
    assert set(rows[:n]) == {3, 6} and set(rows[n:]) == {4, 8}
    for a, b in zip(plain, padded):
        torch.testing.assert_close(b.latents, a.latents, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(b.corrections, a.corrections, rtol=1e-9, atol=1e-9)


def test_the_shard_inverts_at_least_four_sources_per_call(tiny):
    """The cold path at the working batch: even with --max-batch 1, a shard's sources share inversion
    calls, four at a time (tasks.shard.invert_sources)."""
    from tasks.options import RunOptions
    from tasks.shard import invert_sources

    images, prompts = [make_image(i) for i in range(5)], ["a photo of a cat"] * 5
    options = RunOptions(out="unused", max_batch=1)
    facts = [{"source_prompt": p} for p in prompts]
    rows = []
    handle = tiny.unet.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))
    try:
        invs = invert_sources(tiny, images, prompts, 2, options, facts)
    finally:
        handle.remove()
    assert all(not isinstance(inv, Exception) for inv in invs) and len(invs) == 5
    # 4 sources, then the fifth: inversion calls of 4 and 1 rows, guided calls of 8 and 2
    assert sorted(set(rows)) == [1, 2, 4, 8]
