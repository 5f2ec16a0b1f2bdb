"""The GPU check: every engine path on SD 1.5's shape in fp16 and bf16, a pass/fail table, offline.

    python -m benchmarks.gpu --check                        # CUDA: SD 1.5 shape, 512 px, fp16 + bf16 (< 4 min)
    python -m benchmarks.gpu --check --device cpu --tiny    # CPU: the same checks on a tiny model, fp32 + bf16

Random weights built from configs (``benchmarks.gpu``), saved once as a diffusers folder and loaded
through ``editing.load_model`` per dtype, as the pipeline does; nothing is downloaded. A random UNet makes
DDIM chaotic (a rounding difference grows ~1e3x over a few guided steps: measured on the tiny model), which
would bury a real precision bug under noise, so the check's UNet has its output layer scaled by
`OUT_GAIN` (noise predictions ~0.04 std instead of ~0.4) and the identity edits run at guidance 1. Per dtype:

- batched inversion: ``invert_many`` of three sources equals inverting each alone (within `batch` tol.);
- PnP (K = 2, live source row, features recorded) and PnP replaying those cached features (within `replay`);
- P2P replace, refine, reweight and local blend in one batch (each changes the result; local blend keeps
  part of the latent exactly the source's);
- identity edits (target = source prompt, PnP and P2P, guidance 1, target corrections on) against the
  same edits of a reference model in fp32 (fp64 when the dtype checked is fp32) within `identity` tol.;
- the shard task path (``tasks.planning.plan_run`` + ``tasks.shard.run_shard``, local store, no Prefect)
  for a 2-source x 2-target manifest, and two shard workers (separate processes) sharing one device
  (on CPU for the first dtype only);
- for the first dtype, the compiled pass: PnP and P2P through a ``torch.compile``d UNet equal eager, with
  no graph break and no recompile when run again (CUDA: reduce-overhead; CPU: dynamo's eager backend).

Tolerances are relative (max |a - b| / max |b|) and printed with the measured value. Exit status 1 on
any failure. On CUDA the whole run must also finish within 240 s (a row of the table).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from benchmarks._common import REPO_ROOT, print_table, smooth_image

# relative tolerances per checked dtype (max |a - b| / max |b|), set at ~2-4x what the tiny CPU model gives
# (fp32: batch 2.5e-4, gaps 3.4e-3, replay 4e-2, identity 1.7e-4; bf16: 4e-2, 0.29, 0, 0.18); fp16 has 3
# more mantissa bits than bf16. Not yet calibrated on a GPU: the first CUDA run's measured values say.
TOLERANCES = {
    "float32": {"batch": 1e-3, "gaps": 1e-2, "replay": 1e-1, "identity": 2e-3},
    "float16": {"batch": 5e-2, "gaps": 3e-1, "replay": 1e-1, "identity": 2e-1},
    "bfloat16": {"batch": 1e-1, "gaps": 6e-1, "replay": 2e-1, "identity": 4e-1},
}
OUT_GAIN = 0.1  # the check model's UNet output-layer scale (see the module docstring)
CHANGED = 1e-3  # an edit "changes" the latent when it moves it by more than this (relative)
TIME_BUDGET_S = 240.0
SOURCES = ("a photo of a cat", "a photo of a dog", "a red car on gray background")
WORKER_TIMEOUT_S = 200


class CheckFailed(AssertionError):
    """A check's condition did not hold; the message says what was measured."""


@dataclass
class Row:
    check: str
    dtype: str
    ok: bool
    detail: str
    seconds: float


def rel(a, b) -> float:
    """max |a - b| / max |b| in float64 on the CPU."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def expect(cond: bool, detail: str) -> str:
    if not cond:
        raise CheckFailed(detail)
    return detail


def run_checks(checks: list[tuple[str, str, Callable[[], str]]], log=print) -> list[Row]:
    """Run each (name, dtype, fn); fn returns a detail line or raises. Failures do not stop the run."""
    rows = []
    for name, dtype, fn in checks:
        t0 = time.perf_counter()
        try:
            detail, ok = fn(), True
        except Exception as exc:  # noqa: BLE001 - every failure becomes a row of the table
            detail, ok = f"{type(exc).__name__}: {exc}"[:300], False
        rows.append(Row(name, dtype, ok, detail, time.perf_counter() - t0))
        log(f"  {'PASS' if ok else 'FAIL'} {name} [{dtype}] ({rows[-1].seconds:.1f}s): {detail}")
    return rows


def report(rows: list[Row], title: str) -> int:
    print_table(["check", "dtype", "result", "s", "detail"], [[r.check, r.dtype, "PASS" if r.ok else "FAIL", r.seconds, r.detail] for r in rows],
                title=title)  # fmt: skip
    failed = [r for r in rows if not r.ok]
    print(f"{len(rows) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


def cpu_supports(dtype) -> bool:
    """Whether this CPU runs the UNet's kinds of ops (conv, matmul, softmax) in `dtype`."""
    import torch
    import torch.nn.functional as F

    try:
        x = torch.ones(1, 2, 4, 4, dtype=dtype)
        F.conv2d(x, torch.ones(2, 2, 3, 3, dtype=dtype), padding=1).softmax(-1) @ torch.ones(
            4, 4, dtype=dtype
        )
        F.scaled_dot_product_attention(*(torch.ones(1, 2, 4, 8, dtype=dtype),) * 3)
        return True
    except (RuntimeError, NotImplementedError):
        return False


# ---------------------------------------------------------------- the checks of one dtype


class Checks:
    """The checks of one model dtype; `ref` is the reference-precision model (fp32, or fp64 for fp32)."""

    def __init__(
        self, model, ref, dtype_name: str, steps: int, folder: Path, device: str, work: Path
    ):
        self.m, self.ref, self.name, self.steps = model, ref, dtype_name, steps
        self.folder, self.device, self.work = folder, device, work
        self.tol = TOLERANCES[dtype_name]
        size = model.native_size
        self.images = [smooth_image(200 + i, size) for i in range(len(SOURCES))]
        self.invs = None
        self.live = None

    def all(self, *, processes: bool = True) -> list[tuple[str, str, Callable[[], str]]]:
        """Every check of this dtype; `processes=False` leaves out the two-worker-process check (on CPU
        it runs for the first dtype only: it checks processes sharing a device, ~10 s each time)."""
        return [(name, self.name, fn) for name, fn in (
            ("batched inversion (3 sources)", self.batched_inversion),
            ("PnP (K=2)", self.pnp),
            ("PnP replaying cached features", self.pnp_replay),
            ("P2P replace/refine/reweight/local blend", self.p2p),
            ("identity edit vs reference", self.identity),
            ("shard task path (local store)", self.shard_path),
            ("two shard workers, one device", self.two_workers),
        ) if processes or fn != self.two_workers]  # fmt: skip

    def compiled_pass(self) -> tuple[str, str, Callable[[], str]]:
        """The compiled pass (run once, for the first dtype): see :meth:`compiled`."""
        return ("compiled UNet vs eager", self.name, self.compiled)

    def compiled(self) -> str:
        """PnP (recording features) and P2P (replace, local blend) of two sources through a
        ``torch.compile``d UNet (editing.model.compile_unet on a model of its own; CUDA: mode
        reduce-overhead, i.e. inductor and CUDA graphs; CPU: dynamo with the eager backend, to stay cheap)
        equal the eager model's edits at the same padded shapes (within `batch` tol.), with no graph break
        and no new graph when the same edits run again (one graph per chunk kind and shape, not per step)."""
        import torch
        import torch._dynamo
        from torch._dynamo.utils import counters

        from editing.configs import P2PConfig, PnPConfig
        from editing.methods import SourceGroup, Target, edit
        from editing.model import compile_unet, load_model

        blend = P2PConfig(
            blend_source_words=("cat",), blend_target_words=("dog",), blend_fraction=0.25
        )
        targets = [
            Target("a photo of a dog", PnPConfig()),
            Target("a photo of a red cat", PnPConfig(inject_uncond=True)),
            Target("a photo of a dog", P2PConfig(kind="replace")),
            Target("a photo of a dog", blend),
        ]
        cat, dog = self._inversions()[:2]  # the local blend's words are the cat source's
        cuda = torch.device(self.device).type == "cuda"
        # CPU: one source's PnP edits (one graph: ~9 s of tracing each, so the CPU test stays cheap;
        # P2P compiled is tests/editing/test_compile.py's); CUDA: two sources, PnP and P2P (3 graphs)
        groups = (
            [SourceGroup(cat, targets), SourceGroup(dog, targets[:3])]
            if cuda
            else [SourceGroup(cat, targets[:2])]
        )
        t0 = time.perf_counter()
        eager = edit(self.m, groups, pad=True, record_features=True, isolate_failures=False)
        _sync(self.device)
        eager_s = time.perf_counter() - t0
        model = load_model(self.folder, device=self.device, dtype=self.m.dtype)
        torch._dynamo.reset()
        counters.clear()
        mode = compile_unet(
            model, "reduce-overhead" if cuda else "default", backend="inductor" if cuda else "eager"
        )
        try:
            t0 = time.perf_counter()
            ours = edit(model, groups, record_features=True, isolate_failures=False)
            _sync(self.device)
            first_s = time.perf_counter() - t0
            graphs = counters["stats"]["unique_graphs"]
            t0 = time.perf_counter()
            again = edit(model, groups, record_features=True, isolate_failures=False)
            _sync(self.device)
            again_s = time.perf_counter() - t0
            regraphs = counters["stats"]["unique_graphs"] - graphs
            breaks = sum(counters["graph_break"].values())
        finally:
            torch._dynamo.reset()
        pairs = [(b, a) for ge, gc in zip(eager, ours) for a, b in zip(ge, gc)]
        pairs += [(b, a) for ge, gc in zip(eager, again) for a, b in zip(ge, gc)]
        worst = max(rel(b.latent, a.latent) for b, a in pairs)
        expect(all(bool(b.latent.isfinite().all()) for b, _ in pairs), "non-finite compiled edit")
        expect(breaks == 0, f"{breaks} graph break(s) in the UNet forward")
        expect(regraphs == 0, f"the same edits again made {regraphs} new graph(s)")
        detail = (
            f"mode {mode}: {graphs} graphs, 0 breaks; rel {worst:.1e} (tol {self.tol['batch']:.0e}); "
            f"eager {eager_s:.1f}s, compiled {first_s:.1f}s first, {again_s:.1f}s again"
        )
        return expect(worst <= self.tol["batch"], detail)

    def _inversions(self):
        from editing.inversion import invert_many

        if self.invs is None:
            self.invs = invert_many(self.m, self.images, list(SOURCES), num_steps=self.steps)
        return self.invs

    def batched_inversion(self) -> str:
        """Latents must match tightly (a mixed-up row is off by ~1); the Direct Inversion gaps, made by a
        guided (7.5) pass, carry the batch's rounding amplified, so they get the looser `gaps` tolerance."""
        from editing.inversion import invert

        invs = self._inversions()
        lat, gap = 0.0, 0.0
        for img, prompt, inv in zip(self.images[:2], SOURCES, invs):
            alone = invert(self.m, img, prompt, num_steps=self.steps)
            scale = (
                alone.latents.abs().max()
            )  # the gaps are added to the latents: measured on their scale
            lat = max(lat, rel(inv.latents, alone.latents))
            gap = max(gap, float((inv.corrections - alone.corrections).abs().max() / scale))
        finite = all(
            bool(inv.latents.isfinite().all() and inv.corrections.isfinite().all()) for inv in invs
        )
        expect(finite, "non-finite inversion")
        detail = f"batched vs alone: latents rel {lat:.1e} (tol {self.tol['batch']:.0e}), gaps {gap:.1e} (tol {self.tol['gaps']:.0e})"
        return expect(lat <= self.tol["batch"] and gap <= self.tol["gaps"], detail)

    def pnp(self) -> str:
        from editing.configs import PnPConfig
        from editing.methods import SourceGroup, Target, edit_pnp

        inv = self._inversions()[0]
        targets = [
            Target("a photo of a dog", PnPConfig()),
            Target("a photo of a red cat", PnPConfig(inject_uncond=True)),
        ]
        res = edit_pnp(self.m, [SourceGroup(inv, targets)], record_features=True)[0]
        self.live = (targets, res)
        moved = min(rel(r.latent, inv.latents[0]) for r in res)
        expect(all(bool(r.latent.isfinite().all()) for r in res), "non-finite edit")
        expect(res[0].features is not None and res[0].features.nbytes > 0, "no features recorded")
        return expect(
            moved > CHANGED,
            f"edits move the latent by rel >= {moved:.2e}; features {res[0].features.nbytes / 2**20:.1f} MiB",
        )

    def pnp_replay(self) -> str:
        from editing.methods import PnPFeatures, SourceGroup, edit_pnp

        if self.live is None:
            self.pnp()
        targets, live = self.live
        inv = self._inversions()[0]
        feats = PnPFeatures.from_bytes(live[0].features.to_bytes())
        replay = edit_pnp(self.m, [SourceGroup(inv, targets, features=feats)])[0]
        worst = max(rel(b.latent, a.latent) for a, b in zip(live, replay))
        expect(all(r.unet_evals["source"] == 0 for r in replay), "replay ran a source row")
        return expect(
            worst <= self.tol["replay"],
            f"replay vs live rel {worst:.2e} (tol {self.tol['replay']:.0e})",
        )

    def p2p(self) -> str:
        from editing.configs import P2PConfig
        from editing.methods import SourceGroup, Target, edit_p2p

        inv = self._inversions()[0]
        src = inv.source_prompt  # "a photo of a cat"
        # maps from the layers with 1/4 of the latent's positions (SD 1.5: 32x32): cells for a partial mask
        blend = P2PConfig(blend_source_words=("cat",), blend_target_words=("dog",), blend_fraction=0.25,
                          blend_threshold=0.9)  # fmt: skip
        targets = [
            Target("a photo of a dog", P2PConfig(kind="replace")),
            Target("a photo of a big cat", P2PConfig(kind="refine")),
            Target(src, P2PConfig(kind="reweight", equalizer={"cat": 4.0})),
            Target("a photo of a dog", blend),
            Target(src, P2PConfig()),  # identity: the reweight's baseline
        ]
        res = edit_p2p(self.m, [SourceGroup(inv, targets)])[0]
        z0 = inv.latents[0]
        expect(all(bool(r.latent.isfinite().all()) for r in res), "non-finite edit")
        d = {
            "replace": rel(res[0].latent, z0),
            "refine": rel(res[1].latent, z0),
            "reweight": rel(res[2].latent, res[4].latent),
        }
        for kind, v in d.items():
            expect(v > CHANGED, f"{kind} did not change the result (rel {v:.1e})")
        kept = float(((res[3].latent - z0).abs().amax(0) == 0).float().mean())
        expect(
            0.0 < kept < 1.0,
            f"local blend kept {kept:.0%} of the latent exactly (want some, not all)",
        )
        return (
            ", ".join(f"{k} rel {v:.1e}" for k, v in d.items()) + f"; local blend kept {kept:.0%}"
        )

    def identity(self) -> str:
        from editing.configs import P2PConfig, PnPConfig
        from editing.inversion import invert
        from editing.methods import SourceGroup, Target, edit

        cfgs = [
            PnPConfig(target_correction=True, inject_uncond=False, guidance_scale=1.0),
            P2PConfig(target_correction=True, guidance_scale=1.0),
        ]
        inv = invert(self.m, self.images[0], SOURCES[0], num_steps=self.steps, guidance_scale=1.0)
        ref_inv = invert(
            self.ref, self.images[0], SOURCES[0], num_steps=self.steps, guidance_scale=1.0
        )
        ours = edit(self.m, [SourceGroup(inv, [Target(inv.source_prompt, c) for c in cfgs])])[0]
        theirs = edit(
            self.ref, [SourceGroup(ref_inv, [Target(ref_inv.source_prompt, c) for c in cfgs])]
        )[0]
        worst = max(rel(a.latent, b.latent) for a, b in zip(ours, theirs))
        recon = max(rel(a.latent, inv.latents[0]) for a in ours)
        ref_name = str(self.ref.dtype).replace("torch.", "")
        return expect(worst <= self.tol["identity"],
                      f"vs {ref_name} rel {worst:.2e} (tol {self.tol['identity']:.0e}); own reconstruction rel {recon:.1e}")  # fmt: skip

    # -- the shard path
    def _plan(self, label: str, shard_size: int):
        import pyarrow as pa

        from storage.uri import open_store
        from storage.writer import png_bytes, write_parquet
        from tasks.options import RunOptions
        from tasks.planning import plan_run

        root = self.work / f"{label}-{self.name}"
        store = open_store(str(root))
        uris = []
        for i, img in enumerate(self.images[:2]):
            store.put(f"images/src-{i}.png", png_bytes(img))
            uris.append(store.uri(f"images/src-{i}.png"))
        rows = {
            "image_uri": [],
            "source_prompt": [],
            "target_prompt": [],
            "method": [],
            "num_steps": [],
        }
        for uri, prompt in zip(uris, SOURCES):  # "a photo of a cat", "a photo of a dog"
            for target, method in (
                (prompt.replace("a photo of a ", "a photo of a red "), "pnp"),
                (prompt + " with a hat", "p2p"),
            ):
                rows["image_uri"].append(uri)
                rows["source_prompt"].append(prompt)
                rows["target_prompt"].append(target)
                rows["method"].append(method)
                rows["num_steps"].append(self.steps)
        write_parquet(store, "manifest.parquet", pa.table(rows))
        options = RunOptions(
            out=str(root / "out"), model=str(self.folder), device=self.device, dtype=self.name
        )
        planned = plan_run(
            store.uri("manifest.parquet"), options, run_id=label, shard_size=shard_size
        )
        return options, planned, len(rows["image_uri"])

    def _results_ok(self, options, run_id: str, expected: int) -> str:
        import io

        from PIL import Image

        from storage.uri import read_uri
        from tasks.shard import read_run_results

        table = read_run_results(options, run_id).to_pylist()
        status = [r["status"] for r in table]
        errors = [r["error"] for r in table if r["status"] != "succeeded"]
        expect(
            len(table) == expected and status.count("succeeded") == expected,
            f"statuses {status}; errors {errors[:2]}",
        )
        sizes = {Image.open(io.BytesIO(read_uri(r["output_uri"]))).size for r in table}
        return f"{expected} edits succeeded, outputs {sorted(sizes)}"

    def shard_path(self) -> str:
        from tasks.shard import run_shard

        options, planned, n = self._plan("shard", shard_size=8)
        for s in range(len(planned["shards"])):
            run_shard(options, "shard", s)
        return self._results_ok(options, "shard", n) + f" in {len(planned['shards'])} shard(s)"

    def two_workers(self) -> str:
        options, planned, n = self._plan("workers", shard_size=2)
        expect(len(planned["shards"]) == 2, f"planned {len(planned['shards'])} shards, want 2")
        code = ("import json, sys; from tasks.options import RunOptions; from tasks.shard import run_shard; "
                "print(json.dumps(run_shard(RunOptions.from_dict(json.loads(sys.argv[1])), sys.argv[2], int(sys.argv[3]))))")  # fmt: skip
        env = dict(
            os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
        )
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", code, json.dumps(options.to_dict()), "workers", str(s)],
                cwd=REPO_ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )  # fmt: skip
            for s in range(2)
        ]
        outs = []
        for p in procs:
            try:
                out, err = p.communicate(timeout=WORKER_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                raise CheckFailed(f"a worker ran past {WORKER_TIMEOUT_S}s") from None
            expect(
                p.returncode == 0, f"worker exited {p.returncode}: {err.strip().splitlines()[-1:]}"
            )
            outs.append(json.loads(out.strip().splitlines()[-1]))
        expect(all(o["succeeded"] == 2 for o in outs), f"worker results {outs}")
        return self._results_ok(options, "workers", n) + ", 2 worker processes at once"


# ---------------------------------------------------------------- entry point


def _sync(device: str) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def main(device: str | None, tiny: bool, dtypes: list[str] | None, steps: int | None) -> int:
    import torch

    from benchmarks.gpu import save_model_folder
    from editing.model import load_model

    t_start = time.perf_counter()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: use --device cpu --tiny for the CPU form of the check")
        return 1
    on_cpu = torch.device(device).type == "cpu"
    if on_cpu and not tiny:
        print("the SD 1.5 shape on a CPU takes far too long; add --tiny")
        return 1
    if dtypes is None:
        dtypes = (
            (["float32"] + (["bfloat16"] if cpu_supports(torch.bfloat16) else []))
            if on_cpu
            else ["float16", "bfloat16"]
        )
        if on_cpu and "bfloat16" not in dtypes:
            print("this CPU does not run bf16: checking fp32 only")
    unknown = [d for d in dtypes if d not in TOLERANCES]
    if unknown:
        raise ValueError(f"--dtypes must be among {sorted(TOLERANCES)}, got {unknown}")
    steps = steps or (5 if tiny else 10)
    name = torch.cuda.get_device_name(torch.device(device)) if not on_cpu else "cpu"
    work = Path(tempfile.mkdtemp(prefix="editflow-check-"))
    folder = work / "model"
    saved = torch.float32 if on_cpu else torch.float16
    save_model_folder(
        folder, device, saved, tiny, out_gain=OUT_GAIN
    )  # random weights; loaded per dtype below
    print(f"  model folder built in {time.perf_counter() - t_start:.1f}s ({'tiny' if tiny else 'SD 1.5 shape'}, {name}, T = {steps})",
          flush=True)  # fmt: skip
    rows: list[Row] = []
    refs: dict[str, object] = {}
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        ref_dtype = torch.float64 if dtype == torch.float32 else torch.float32
        if str(ref_dtype) not in refs:
            refs.clear()  # one reference model in memory at a time
            refs[str(ref_dtype)] = load_model(folder, device=device, dtype=ref_dtype)
        model = load_model(folder, device=device, dtype=dtype)
        checks = Checks(model, refs[str(ref_dtype)], dtype_name, steps, folder, device, work)
        rows += run_checks(
            checks.all(processes=not on_cpu or dtype_name == dtypes[0])
            + ([checks.compiled_pass()] if dtype_name == dtypes[0] else [])
        )
        del model, checks
        if not on_cpu:
            torch.cuda.empty_cache()
    wall = time.perf_counter() - t_start
    if not on_cpu:
        ok = wall <= TIME_BUDGET_S
        rows.append(
            Row(
                "whole check, model build included",
                "-",
                ok,
                f"{wall:.0f}s (budget {TIME_BUDGET_S:.0f}s)",
                wall,
            )
        )
    code = report(
        rows,
        f"GPU check ({name}, {'tiny model' if tiny else 'SD 1.5 shape, random weights'}, T = {steps})",
    )
    print(f"(wall {wall:.0f}s)")
    shutil.rmtree(
        work, ignore_errors=True
    )  # the model folder (~2 GB for SD 1.5's shape) and the stores
    return code
