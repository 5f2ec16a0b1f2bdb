"""CPU thread policy: edits per minute with 1 and 2 shard workers on this machine, torch's default threads
vs editflow's policy (CPUs / workers per worker process).

    python -m benchmarks.cpu_threads                 # BENCH toy, 4 sources x 4 targets, T = 20, 2 repeats
    python -m benchmarks.cpu_threads --quick         # TINY toy, 2 sources x 2 targets, T = 8, 1 repeat
    python -m benchmarks.cpu_threads --workers 1 2 4 --repeats 3

What runs: one generated manifest (N sources x K PnP targets, one source per shard) is planned with
``tasks.planning.plan_run``; then W worker *processes* (as Dask's worker processes, or several editflow
processes on one machine) each load the model once through ``tasks.worker.get_model`` and, after a
common start signal, run their share of the shards with ``tasks.shard.run_shard`` exactly as a worker
does. Edits per minute = all edits / (last worker's end - start signal); model loading is not timed.
Each mode gets a fresh output root and inversion cache (cold: inversions computed).

Policies, per worker process:

- torch default: what torch picks when nothing sets OMP_NUM_THREADS (its default, usually the
  physical cores; measured in a fresh process and forced with EDITFLOW_THREADS);
- policy: ``tasks.worker.apply_thread_policy`` with ``EDITFLOW_WORKERS_PER_MACHINE=W`` (what editflow
  tells the workers of its local Dask cluster): the CPU budget // W.

Modes run in a rotating order per repeat so that drift on a shared machine does not favour one.
Outputs are checked to be identical across modes (same edits, same bytes would need the same thread
count; the check is on counts and succeeded edits). Check ``loadavg_at_start`` in the JSON: another
process using the cores changes the picture completely (that is the point of the policy, and of
``EDITFLOW_THREADS`` when the machine is shared with other work).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (  # noqa: E402
    REPO_ROOT,
    build_toy,
    machine_facts,
    png,
    print_machine,
    print_table,
    setup_torch,
    smooth_image,
    write_result,
)

PROMPTS = (
    "a photo of a cat",
    "a photo of a dog",
    "a red car on gray background",
    "a blue bag on gray background",
)
STYLES = ("in watercolor style", "with a hat", "on a crowded street", "in green")
_CHILD_ENV_CLEARED = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "EDITFLOW_THREADS",
    "EDITFLOW_WORKERS_PER_MACHINE",
    "BENCH_THREADS",
)


def torch_default_threads() -> int:
    """torch's own intra-op thread count in a fresh process with no OMP/MKL variables."""
    env = {k: v for k, v in os.environ.items() if k not in _CHILD_ENV_CLEARED}
    out = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout.strip())


def make_manifest(folder: Path, n_sources: int, k: int, steps: int, image_size: int) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for s in range(n_sources):
        path = folder / f"src-{s}.png"
        path.write_bytes(png(smooth_image(s, image_size)))
        prompt = PROMPTS[s % len(PROMPTS)]
        for j in range(k):
            rows.append({"image_uri": str(path), "source_prompt": prompt, "target_prompt": f"{prompt} {STYLES[j % len(STYLES)]}",
                         "method": "pnp", "num_steps": steps, "edit_id": f"s{s}-t{j}"})  # fmt: skip
    path = folder / "manifest.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def run_mode(
    manifest: Path,
    model: Path,
    workers: int,
    policy: str,
    default_threads: int,
    shard_size: int,
    work: Path,
    log,
) -> dict:
    """Plan into a fresh root, start `workers` worker processes, time them from a common start signal."""
    from tasks.options import RunOptions
    from tasks.planning import plan_run

    root = work / f"w{workers}-{policy.replace(' ', '_')}-{time.time_ns()}"
    root.mkdir()
    options = RunOptions(out=str(root / "out"), model=str(model))
    planned = plan_run(str(manifest), options, run_id="bench", shard_size=shard_size)
    shards = list(range(len(planned["shards"])))
    env = {k: v for k, v in os.environ.items() if k not in _CHILD_ENV_CLEARED}
    if policy == "torch default":
        env["EDITFLOW_THREADS"] = str(default_threads)
        env["BENCH_THREADS"] = str(default_threads)
    else:
        env["EDITFLOW_WORKERS_PER_MACHINE"] = str(workers)
        env["BENCH_POLICY_MODE"] = (
            "1"  # benchmarks._common then sets no OMP_NUM_THREADS in the worker
        )
    go = root / "go"
    procs = []
    for w in range(workers):
        mine = shards[w::workers]
        spec = {
            "options": options.to_dict(),
            "shards": mine,
            "go": str(go),
            "ready": str(root / f"ready-{w}"),
            "report": str(root / f"report-{w}.json"),
        }
        (root / f"spec-{w}.json").write_text(json.dumps(spec))
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "benchmarks.cpu_threads",
                    "--worker",
                    str(root / f"spec-{w}.json"),
                ],
                cwd=REPO_ROOT,
                env=env,
            )
        )
    deadline = time.time() + 600
    while not all((root / f"ready-{w}").exists() for w in range(workers)):
        if any(p.poll() not in (None, 0) for p in procs) or time.time() > deadline:
            for p in procs:
                p.kill()
            raise RuntimeError(f"a worker did not start ({[p.poll() for p in procs]})")
        time.sleep(0.05)
    t0 = time.time()
    go.write_text(str(t0))
    for p in procs:
        if p.wait() != 0:
            raise RuntimeError(f"a worker failed with exit status {p.returncode}")
    reports = [json.loads((root / f"report-{w}.json").read_text()) for w in range(workers)]
    wall = max(r["end"] for r in reports) - t0
    edits = sum(r["edits"] for r in reports)
    succeeded = sum(r["succeeded"] for r in reports)
    threads = sorted({r["threads"] for r in reports})
    log(
        f"{workers} worker(s), {policy}: {edits} edits in {wall:.1f}s ({succeeded} succeeded), threads per worker {threads}"
    )
    return {"workers": workers, "policy": policy, "threads_per_worker": threads, "edits": edits, "succeeded": succeeded,
            "wall_s": wall, "edits_per_min": 60.0 * edits / wall if wall > 0 else None,
            "per_worker_s": [r["end"] - t0 for r in reports]}  # fmt: skip


def worker_main(spec_path: str) -> int:
    """One worker process: load the model, signal ready, wait for the start, run its shards, report."""
    from tasks.options import RunOptions
    from tasks.shard import run_shard
    from tasks.worker import apply_thread_policy, get_model

    setup_torch()  # quiet loading (its thread count is replaced by the policy's next)
    spec = json.loads(Path(spec_path).read_text())
    options = RunOptions.from_dict(spec["options"])
    threads = apply_thread_policy(options.threads)
    get_model(options.model_ref, device="cpu")
    Path(spec["ready"]).write_text("1")
    while not os.path.exists(spec["go"]):
        time.sleep(0.01)
    edits = succeeded = 0
    for s in spec["shards"]:
        st = run_shard(options, "bench", s)
        edits += st["edits"]
        succeeded += st["succeeded"]
    Path(spec["report"]).write_text(
        json.dumps({"end": time.time(), "edits": edits, "succeeded": succeeded, "threads": threads})
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument(
        "--quick", action="store_true", help="TINY toy, 2 sources x 2 targets, T = 8, 1 repeat"
    )
    ap.add_argument(
        "--spec",
        choices=("TINY", "BENCH"),
        default=None,
        help="toy model (default BENCH; --quick: TINY)",
    )
    ap.add_argument("--sources", type=int, default=None)
    ap.add_argument("--targets", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args(argv)
    if args.worker:
        return worker_main(args.worker)
    spec = args.spec or ("TINY" if args.quick else "BENCH")
    n_sources = args.sources or (2 if args.quick else 4)
    k = args.targets or (2 if args.quick else 4)
    steps = args.steps or (8 if args.quick else 20)
    repeats = args.repeats or (1 if args.quick else 2)
    facts = machine_facts()
    print_machine(facts)
    default_threads = torch_default_threads()
    from tasks.worker import cpu_budget

    print(
        f"# CPU budget {cpu_budget()}, torch default threads {default_threads}; {spec} toy, {n_sources} sources x {k} targets, T = {steps}"
    )
    modes = [(w, p) for w in args.workers for p in ("torch default", "policy")]
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-threads-") as tmp:
        work = Path(tmp)
        model = build_toy(work / "model", spec, seed=0)
        manifest = make_manifest(work, n_sources, k, steps, image_size=64)
        for rep in range(repeats):
            order = modes[rep % len(modes) :] + modes[: rep % len(modes)]
            for w, p in order:
                runs.append(
                    run_mode(
                        manifest, model, w, p, default_threads, shard_size=k, work=work, log=print
                    )
                    | {"repeat": rep}
                )
    rows = []
    for w, p in modes:
        mine = [r for r in runs if r["workers"] == w and r["policy"] == p]
        rates = [r["edits_per_min"] for r in mine]
        rows.append(
            [
                w,
                p,
                ",".join(str(t) for t in mine[0]["threads_per_worker"]),
                mine[0]["edits"],
                max(rates),
                min(rates),
            ]
        )
    print_table(["workers", "threads", "threads/worker", "edits", "edits/min (best)", "edits/min (worst)"], rows,
                title=f"{spec} toy, T = {steps}, {n_sources} x {k} edits, {repeats} repeat(s), load at start {facts['loadavg_at_start']}")  # fmt: skip
    write_result(
        "cpu_threads",
        {"config": {"spec": spec, "sources": n_sources, "targets": k, "steps": steps, "repeats": repeats, "workers": args.workers,
                    "cpu_budget": cpu_budget(), "torch_default_threads": default_threads}, "runs": runs},
        facts=facts,
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
