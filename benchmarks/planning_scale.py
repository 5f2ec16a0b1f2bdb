"""Scale of planning: validate + plan a generated manifest of N rows; seconds and peak memory.

    python -m benchmarks.planning_scale                      # 100k, 300k and 1M rows (~2-4 min)
    python -m benchmarks.planning_scale --rows 2000000       # 100k, 300k, 1M and 2M
    python -m benchmarks.planning_scale --sizes 100000,1000000
    python -m benchmarks.planning_scale --quick              # 100k and 300k
    python -m benchmarks.planning_scale --sizes 1000000,10000000   # the targets (~3-5 min)

For each size a manifest is generated first (untimed, in this process) and written as one Parquet
file: N rows, 4 target prompts per source image (N/4 distinct images and captions), PnP, no edit_id
(so every id is derived, the expensive path), default steps/guidance, and a passthrough ``sku``
column. Then a fresh child process (``--child``) imports editflow, runs
``tasks.planning.plan_run(manifest, RunOptions(out=<temp folder>), shard_size=256)`` (load, validate,
normalise, derive ids, group by source, pack shards, write the shard plans 64 shards to a Parquet file
plus plan.json: ~3,900 shards in 62 files at 1M rows; 256 rather than the automatic size, so that
figures compare with earlier ones) and reports its wall time and its peak resident memory
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``; a fresh process per size, so one size's peak does not
hide the next). The memory after the imports alone (torch is imported by ``tasks.options``) is
reported too, so that the planning's own share is visible, and the child's CPU seconds (user +
system, its own threads included), which other processes on a shared machine inflate less than
the wall time.

Targets (issue 18): 1M rows in < 15 s with peak RSS < 600 MB, 10M rows in < 120 s with peak RSS
< 2 GB, on this 2-core machine; the cost must grow linearly (compare the seconds per 100k rows).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import REPO_ROOT, machine_facts, print_machine, print_table, write_result  # noqa: E402

# rows -> (seconds, peak RSS MB): issue 18's targets
TARGETS = {1_000_000: (15.0, 600.0), 10_000_000: (120.0, 2048.0)}
TARGETS_PER_SOURCE = 4
STYLES = ("in watercolor style", "as a pencil sketch", "on a marble table", "in neon colours")
DEFAULT_SIZES = (100_000, 300_000, 1_000_000)


def generate(n: int, path: Path) -> dict:
    """Write an N-row manifest to `path`; returns its facts."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    t0 = time.perf_counter()
    src = pa.array(np.arange(n, dtype=np.int64) // TARGETS_PER_SOURCE).cast(pa.string())
    style = pa.array(np.array(STYLES, dtype=object)[np.arange(n) % len(STYLES)], pa.string())
    caption = pc.binary_join_element_wise(
        "a photo of catalogue item ", src, " on a white background", ""
    )
    table = pa.table(
        {
            "image_uri": pc.binary_join_element_wise("s3://catalog/images/item-", src, ".jpg", ""),
            "source_prompt": caption,
            "target_prompt": pc.binary_join_element_wise(caption, style, ", "),
            "method": pa.array(["pnp"] * n, pa.string()),
            "sku": pc.binary_join_element_wise("SKU-", src, ""),
        }
    )
    pq.write_table(table, path, compression="zstd")
    return {
        "rows": n,
        "sources": (n + TARGETS_PER_SOURCE - 1) // TARGETS_PER_SOURCE,
        "bytes": path.stat().st_size,
        "generate_s": time.perf_counter() - t0,
    }


def child(manifest: str, out: str, shard_size: int, endpoint: str | None = None) -> dict:
    """Run in a fresh process: import, plan, report seconds and peak memory (as JSON on stdout)."""
    import resource

    hwm0 = _vm_hwm_mb()
    t_import = time.perf_counter()
    from tasks.options import RunOptions
    from tasks.planning import plan_run

    t_import = time.perf_counter() - t_import
    start = resource.getrusage(resource.RUSAGE_SELF)
    base_kb = start.ru_maxrss
    t0 = time.perf_counter()
    summary = plan_run(
        manifest, RunOptions(out=out, s3_endpoint=endpoint), run_id="scale", shard_size=shard_size
    )
    wall = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    peak_kb = usage.ru_maxrss
    vm_hwm = _vm_hwm_mb()
    from storage.uri import open_store

    files = sum(
        1
        for k in open_store(out, s3_endpoint=endpoint).list("runs/scale/")
        if k.endswith(".parquet")
    )
    return {
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime - start.ru_utime - start.ru_stime,
        "validate_s": summary["seconds"]["validate"],
        "plan_s": summary["seconds"]["plan"],
        "rows": summary["rows"],
        "sources": summary["sources"],
        "shards": len(summary["shards"]),
        "files": files,
        "import_s": t_import,
        "peak_rss_mb": peak_kb / 1024,
        "after_imports_rss_mb": base_kb / 1024,
        "vm_hwm_mb": vm_hwm,
        "vm_hwm_at_start_mb": hwm0,
    }


def _vm_hwm_mb() -> float | None:
    """This process's own peak RSS (Linux VmHWM; unlike ru_maxrss it does not carry a forking parent's)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--rows",
        type=int,
        default=1_000_000,
        help="largest N (default 1,000,000); the default steps below it are kept",
    )
    p.add_argument("--sizes", default=None, help="comma-separated sizes (overrides --rows)")
    p.add_argument("--quick", action="store_true", help="100k and 300k rows only")
    p.add_argument("--shard-size", type=int, default=256)
    p.add_argument("--child", nargs=2, metavar=("MANIFEST", "OUT"), help=argparse.SUPPRESS)
    p.add_argument("--generate", nargs=2, metavar=("ROWS", "PATH"), help=argparse.SUPPRESS)
    p.add_argument("--endpoint", default=None, help=argparse.SUPPRESS)
    p.add_argument(
        "--out-s3",
        action="store_true",
        help="plan into S3 (a moto server started by this script, in the parent process) instead of a local folder",
    )
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.shard_size, args.endpoint)))
        return 0
    if args.generate:
        print(json.dumps(generate(int(args.generate[0]), Path(args.generate[1]))))
        return 0
    if args.sizes:
        sizes = [int(s) for s in args.sizes.split(",")]
    elif args.quick:
        sizes = [100_000, 300_000]
    else:
        sizes = sorted({s for s in DEFAULT_SIZES if s < args.rows} | {args.rows})

    # This process stays small (no torch or pyarrow until the end): a child's ru_maxrss starts from the
    # resident size of the process that forked it, so generating here would inflate the children's peaks.
    print(f"# planning_scale: sizes {sizes}, load {os.getloadavg()}", flush=True)
    results = []

    def run_child(*extra: str) -> dict:
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        }
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "benchmarks.planning_scale",
                "--shard-size",
                str(args.shard_size),
                *extra,
            ],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            print(proc.stdout[-2000:], proc.stderr[-4000:])
            raise SystemExit(f"{extra} failed (exit {proc.returncode})")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    with (
        tempfile.TemporaryDirectory(prefix="editflow-bench-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        endpoint = None
        if args.out_s3:
            from benchmarks._common import make_bucket, moto_s3

            endpoint = stack.enter_context(moto_s3(tmp))
            make_bucket(endpoint, "editflow-bench")
        for n in sizes:
            manifest = Path(tmp) / f"manifest-{n}.parquet"
            gen = run_child("--generate", str(n), str(manifest))
            out = f"s3://editflow-bench/out-{n}" if endpoint else str(Path(tmp) / f"out-{n}")
            t0 = time.perf_counter()
            res = run_child(
                "--child", str(manifest), out, *(["--endpoint", endpoint] if endpoint else [])
            )
            res["process_s"] = time.perf_counter() - t0
            res.update({"manifest_" + k: v for k, v in gen.items() if k != "rows"})
            res["s_per_100k"] = res["wall_s"] / n * 100_000
            res["planning_rss_mb"] = res["peak_rss_mb"] - res["after_imports_rss_mb"]
            results.append(res)
            print(
                f"  {n:,} rows: {res['wall_s']:.1f}s, peak {res['peak_rss_mb']:.0f} MB, {res['shards']} shards",
                flush=True,
            )
            if not endpoint:
                for f in Path(out).rglob("*"):  # keep the temp disk use to one size at a time
                    if f.is_file():
                        f.unlink()
            manifest.unlink()

    facts = machine_facts()
    print_machine(facts)
    print_table(
        [
            "rows",
            "sources",
            "shards",
            "validate s",
            "plan+write s",
            "total s",
            "CPU s",
            "s per 100k",
            "peak RSS MB (ru_maxrss)",
            "VmHWM MB",
            "after imports MB",
            "planning's own MB",
        ],
        [
            [
                r["rows"],
                r["sources"],
                r["shards"],
                r["validate_s"],
                r["plan_s"],
                r["wall_s"],
                r["cpu_s"],
                r["s_per_100k"],
                r["peak_rss_mb"],
                r["vm_hwm_mb"],
                r["after_imports_rss_mb"],
                r["planning_rss_mb"],
            ]
            for r in results
        ],
        title=f"validate + plan (plan_run, shard_size={args.shard_size}, {'S3 output (moto server, localhost)' if args.out_s3 else 'local output folder'})",
    )
    first, last = results[0], results[-1]
    growth = last["s_per_100k"] / first["s_per_100k"]
    mem_growth = (last["planning_rss_mb"] / last["rows"]) / max(
        first["planning_rss_mb"] / first["rows"], 1e-9
    )
    print(
        f"\nlinearity: seconds per 100k rows {first['s_per_100k']:.2f} at {first['rows']:,} -> {last['s_per_100k']:.2f} at {last['rows']:,} "
        f"(x{growth:.2f}; 1.0 = linear); planning memory per row x{mem_growth:.2f}"
    )
    targets = []
    for r in results:
        if r["rows"] not in TARGETS:
            continue
        max_s, max_mb = TARGETS[r["rows"]]
        ok_s, ok_m = r["wall_s"] < max_s, r["peak_rss_mb"] < max_mb
        targets.append(
            {
                "what": f"{r['rows']:,} rows < {max_s:.0f} s and < {max_mb:.0f} MB",
                "seconds": r["wall_s"],
                "cpu_seconds": r["cpu_s"],
                "peak_mb": r["peak_rss_mb"],
                "met": ok_s and ok_m,
            }
        )
        print(
            f"Target: {r['rows']:,} rows in {r['wall_s']:.1f}s (< {max_s:.0f}s: {'MET' if ok_s else 'NOT MET'}; "
            f"CPU {r['cpu_s']:.1f}s), peak {r['peak_rss_mb']:.0f} MB (< {max_mb:.0f} MB: {'MET' if ok_m else 'NOT MET'})"
        )
    print("(noisy: other processes share this machine's cores)")
    write_result(
        "planning_scale_s3" if args.out_s3 else "planning_scale",
        {
            "settings": {
                "shard_size": args.shard_size,
                "targets_per_source": TARGETS_PER_SOURCE,
                "edit_id": "derived",
                "output": "s3 (moto, localhost, parent process)" if args.out_s3 else "local folder",
            },
            "sizes": results,
            "linearity_s_per_row_ratio": growth,
            "linearity_mem_per_row_ratio": mem_growth,
            "targets": targets,
        },
        facts=facts,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
