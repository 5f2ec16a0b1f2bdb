"""The shard path against the bare engine on the same edits: how much of the model's speed a shard keeps.

    python -m benchmarks.shard_overlap                      # 8 sources x 2 edits, 5 repeats, QA off and on
    python -m benchmarks.shard_overlap --label before       # the same script on a tree of an older commit

What runs (issue 21 item 6): the bundled reference model (refmodel/shapes-v2, CPU, fp32, one torch
thread), 8 source images (512 x 512 PNGs in a local folder) x 2 edits each (the demo's prompts: a PnP
colour edit and a P2P shape swap), T = 5 (``--steps``: a CPU edit of this model then costs about what
an SD 1.5 edit does on a GPU at the issue's target, ~0.3 s, so the I/O around it is a like share),
max_batch 8, outputs at the source's size (512 px PNG).

(a) engine: ``editing.invert_many`` (the shard's batches) + ``editing.methods.edit`` on the decoded
    images and targets held in memory, plus ``editing.judge.judge_edits`` when QA is on; inversion is
    included on both sides (the shard's inversion cache is empty: a fresh output root per repeat);
(b) shard: ``tasks.shard.run_shard`` on the planned shard (planning not timed): reads and decodes the
    PNGs, hashes and looks up the inversions, inverts, edits, judges (QA on), encodes and writes every
    edit and sidecar, caches the inversions, writes the results table.

Printed: edits/s of each and shard / engine (target >= 90%; paired: each shard run against the engine
run just before it, as the machine's load drifts between repeats), the shard's per-stage seconds (its own
thread's wall time: what was not hidden behind the model), the thread-seconds of the work around the
model (reads, encodes, writes; summed over threads, so overlapped work shows here and not in the stages),
and the model's busy share of the shard's wall time. The result goes to
benchmarks/results/shard_overlap_{label}.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (  # noqa: E402
    REPO_ROOT,
    machine_facts,
    png,
    print_machine,
    print_table,
    setup_torch,
    smooth_image,
    write_result,
)

MODEL = REPO_ROOT / "refmodel" / "shapes-v2"
DEMO = REPO_ROOT / "manifests" / "examples" / "demo.parquet"
TARGET = 0.90
MODEL_CALLS = ("invert_many", "invert", "edit", "judge_edits")  # tasks.shard's names for model work
AROUND = ("read_uri", "encode_image", "write_asset")  # the I/O around it (thread-seconds)


class Probes:
    """Wraps tasks.shard's model calls (busy seconds, outer calls only: the judge inside an edit's
    chunk callback is not counted twice) and its I/O calls (seconds summed over threads)."""

    def __init__(self) -> None:
        import tasks.shard as shard

        self.shard, self.saved = shard, {}
        self.seconds: dict[str, float] = defaultdict(float)
        self._depth = threading.local()
        self._lock = threading.Lock()

    def _wrap(self, name: str, model: bool) -> None:
        fn = self.saved[name] = getattr(self.shard, name)

        def wrapped(*args, **kwargs):
            outer = model and not getattr(self._depth, "n", 0)
            self._depth.n = getattr(self._depth, "n", 0) + model
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth.n -= model
                with self._lock:
                    if outer:
                        self.seconds["model"] += time.perf_counter() - t0
                    if not model:
                        self.seconds[name] += time.perf_counter() - t0

        setattr(self.shard, name, wrapped)

    def __enter__(self) -> Probes:
        for name in MODEL_CALLS:
            self._wrap(name, True)
        for name in AROUND:
            self._wrap(name, False)
        return self

    def __exit__(self, *exc) -> None:
        for name, fn in self.saved.items():
            setattr(self.shard, name, fn)

    def take(self) -> dict[str, float]:
        out = dict(self.seconds)
        self.seconds.clear()
        return out


def make_manifest(folder: Path, n_sources: int, k: int, size: int, steps: int):
    """n_sources PNGs of `size` px and their manifest (the demo's prompt pairs, k per source)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    demo = pq.read_table(DEMO).to_pylist()
    by_prompt: dict[str, list[dict]] = {}
    for r in demo:
        by_prompt.setdefault(r["source_prompt"], []).append(r)
    pairs = list(by_prompt.values())
    rows = []
    for i in range(n_sources):
        path = folder / "images" / f"src-{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png(smooth_image(i, size)))
        edits = pairs[i % len(pairs)]
        for j in range(k):
            e = edits[j % len(edits)]
            rows.append({"image_uri": str(path), "source_prompt": e["source_prompt"],
                         "target_prompt": e["target_prompt"], "method": e["method"],
                         "settings": e["settings"], "num_steps": steps, "sku": f"{i}-{j}"})  # fmt: skip
    manifest = folder / "manifest.parquet"
    pq.write_table(pa.Table.from_pylist(rows), manifest)
    return manifest


def plan(manifest: Path, root: Path, qa: str, max_batch: int):
    from tasks.options import RunOptions
    from tasks.planning import plan_run

    options = RunOptions(out=str(root / uuid.uuid4().hex[:8]), model=str(MODEL), device="cpu",
                         dtype="float32", threads=1, qa=qa, max_batch=max_batch)  # fmt: skip
    run_id = f"bench-{uuid.uuid4().hex[:8]}"
    planned = plan_run(str(manifest), options, run_id=run_id, shard_size=10_000)
    assert len(planned["shards"]) == 1, planned["shards"]
    return options, run_id


def engine_pass(model, options, run_id: str, probes: Probes) -> dict:
    """The bare engine on the shard's edits, inputs decoded and in memory beforehand (not timed)."""
    import io

    from PIL import Image

    from editing.inversion import invert_many
    from editing.judge import JudgeConfig, judge_edits
    from editing.methods import SourceGroup, Target, edit
    from storage.uri import open_store
    from tasks.shard import group_sources, load_shard

    shard = load_shard(open_store(options.out), run_id, 0)
    groups = group_sources(shard.todo())
    images = [
        Image.open(io.BytesIO(Path(g[0].image_uri).read_bytes())).convert("RGB") for g in groups
    ]
    per_call = max(options.max_batch, 4)
    t0 = time.perf_counter()
    invs = invert_many(model, images, [g[0].source_prompt for g in groups],
                       num_steps=groups[0][0].num_steps, guidance_scale=options.inversion_guidance,
                       size_policy=options.size_policy, max_batch=per_call)  # fmt: skip
    source_groups = [
        SourceGroup(
            inv, [Target(r.target_prompt, r.config, edit_id=r.edit_id, seed=r.seed) for r in g]
        )
        for inv, g in zip(invs, groups)
    ]
    out = edit(model, source_groups, max_batch=options.max_batch)
    if options.qa != "off":
        done = [(r, res) for g, results in zip(groups, out) for r, res in zip(g, results)]
        judge_edits(model, [res.image for _, res in done], [r.source_prompt for r, _ in done],
                    [r.target_prompt for r, _ in done], JudgeConfig(max_batch=3 * options.max_batch),
                    size_policy=options.size_policy)  # fmt: skip
    wall = time.perf_counter() - t0
    n = sum(len(g) for g in groups)
    assert all(not isinstance(r, Exception) for rs in out for r in rs)
    probes.take()
    return {"edits": n, "wall_s": wall, "edits_per_s": n / wall}


def shard_pass(options, run_id: str, probes: Probes) -> dict:
    from tasks.shard import run_shard

    probes.take()
    t0 = time.perf_counter()
    stats = run_shard(options, run_id, 0)
    wall = time.perf_counter() - t0
    around = probes.take()
    assert stats["failed"] == 0, stats
    n = stats["succeeded"]
    return {"edits": n, "wall_s": wall, "edits_per_s": n / wall, "stages_s": stats["seconds"],
            "model_busy_s": around.pop("model", 0.0), "thread_s": around}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sources", type=int, default=8)
    ap.add_argument("--edits", type=int, default=2, help="edits per source")
    ap.add_argument("--size", type=int, default=512, help="source images' side in pixels")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=5, help="T (5: a CPU edit of the bundled model costs "
                    "about what an SD edit does on a GPU at the target, so I/O is the same share)")  # fmt: skip
    ap.add_argument("--qa", nargs="+", default=["off", "on"], choices=["off", "on"])
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--label", default="after", help="names the result file (before / after)")
    args = ap.parse_args(argv)

    setup_torch()
    from editing.judge import DEFAULT_GATE
    from tasks.worker import get_model

    facts = machine_facts()
    print_machine(facts)
    model = get_model(str(MODEL), device="cpu", dtype="float32")  # loaded once, as a worker does
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="shard-overlap-") as tmp, Probes() as probes:
        root = Path(tmp)
        manifest = make_manifest(root / "in", args.sources, args.edits, args.size, args.steps)
        # warm-up (first calls allocate; not measured)
        options, run_id = plan(manifest, root / "out", "off", args.max_batch)
        shard_pass(options, run_id, probes)
        for qa in args.qa:
            runs: dict[str, list[dict]] = {"engine": [], "shard": []}
            for _ in range(args.repeats):  # interleaved, so that load changes hit both alike
                for mode in ("engine", "shard"):
                    options, run_id = plan(
                        manifest,
                        root / "out",
                        "off" if qa == "off" else DEFAULT_GATE,
                        args.max_batch,
                    )
                    runs[mode].append(
                        engine_pass(model, options, run_id, probes)
                        if mode == "engine"
                        else shard_pass(options, run_id, probes)
                    )
            results[qa] = runs
    load_end = [round(x, 2) for x in os.getloadavg()]

    summary = {}
    rows = []
    for qa, runs in results.items():
        med = {m: statistics.median(r["edits_per_s"] for r in rs) for m, rs in runs.items()}
        # each shard run against the engine run just before it (the load changes between repeats)
        pairs = [s["edits_per_s"] / e["edits_per_s"] for e, s in zip(runs["engine"], runs["shard"])]
        summary[qa] = {"median_edits_per_s": med, "ratio_of_medians": med["shard"] / med["engine"],
                       "ratios_paired": pairs, "ratio_paired_median": statistics.median(pairs)}  # fmt: skip
        rows.append([f"QA {qa}", med["engine"], med["shard"], med["shard"] / med["engine"],
                     statistics.median(pairs), f"{min(pairs):.2f}-{max(pairs):.2f}"])  # fmt: skip
    n = args.sources * args.edits
    print_table(["", "engine edits/s (median)", "shard edits/s (median)", "ratio of medians",
                 "paired ratio (median)", "paired range"], rows,
                title=f"{n} edits, {args.repeats} repeats, label {args.label}")  # fmt: skip
    stage_rows = []
    for qa, runs in results.items():
        for r in runs["shard"]:
            st, th = r["stages_s"], r["thread_s"]
            stage_rows.append([f"QA {qa}", r["wall_s"], r["model_busy_s"], r["model_busy_s"] / r["wall_s"],
                               st.get("read", 0.0), st.get("inversion", 0.0), st.get("edit", 0.0),
                               st.get("qa", 0.0), st.get("write", 0.0), th.get("read_uri", 0.0),
                               th.get("encode_image", 0.0), th.get("write_asset", 0.0)])  # fmt: skip
    print_table(["shard", "wall s", "model busy s", "busy share", "stage read", "stage inversion",
                 "stage edit", "stage qa", "stage write", "threads: read_uri", "encode_image",
                 "write_asset"], stage_rows,
                title="shard runs: stages (the shard's own thread) and thread-seconds around the model")  # fmt: skip
    print(f"target: shard >= {TARGET:.0%} of the engine; load average at the end {load_end}")
    write_result(
        f"shard_overlap_{args.label}",
        {"args": vars(args), "load_at_end": load_end, "summary": summary, "runs": results,
         "target_ratio": TARGET},
        facts=facts,
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
