"""Orchestration overhead per shard: the bulk-edit fan-out (flows/bulk_edit.py ``_fan_out``: the bounded
window of shard tasks, the progress watch, collecting stats) with no-op shards, against Prefect's server.

    python -m benchmarks.fan_out                    # 1,000 and 3,000 shards
    python -m benchmarks.fan_out --sizes 1000,10000
    python -m benchmarks.fan_out --quick            # 300 shards

A flow runs ``_fan_out`` over N planned shards with the shard task swapped for a no-op task carrying the
same task settings (retries, no cache): what is measured is Prefect's per-task cost (task run records,
state changes over the API) plus editflow's windowed submission and bookkeeping, not editing. The
thread pool has 1 worker (window: ``IN_FLIGHT_PER_WORKER``), as the CLI's local runner on one GPU.
Prefect's server is the test harness's temporary server (SQLite) started here.

Target (issue 18): < 50 ms per shard, flat from 1k to 10k shards.

Seen at 10k shards (2026-12-03): the harness's server logs ~19k "Subscription queue is full, dropping
message for topic='events'" warnings (its in-memory messaging holds 10,000 events); the fan-out still
finishes every shard.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import machine_facts, print_machine, print_table, write_result  # noqa: E402

TARGET_MS = 50.0


def measure(n: int, out: str) -> dict:
    from prefect import flow
    from prefect.task_runners import ThreadPoolTaskRunner

    import flows.bulk_edit as flows_mod
    from tasks.options import RunOptions
    from tasks.units import _io_task

    @_io_task("edit-shard")
    def noop_shard(options: RunOptions, run_id: str, shard_index: int) -> dict:
        return {"shard": shard_index, "edits": 1, "succeeded": 1, "failed": 0, "skipped": 0}

    @flow(name="fan-out-bench", log_prints=False, task_runner=ThreadPoolTaskRunner(max_workers=1))
    def bench(n: int) -> tuple[int, float]:
        shards = [{"index": i, "edits": 1, "sources": 1} for i in range(n)]
        t0 = time.perf_counter()
        stats, failed = flows_mod._fan_out(RunOptions(out=out), f"bench-{n}", shards, False)
        assert len(stats) == n and not failed
        return len(stats), time.perf_counter() - t0

    real = flows_mod.shard_task
    flows_mod.shard_task = noop_shard
    try:
        t0 = time.perf_counter()
        done, fan_out_s = bench(n)
        flow_s = time.perf_counter() - t0
    finally:
        flows_mod.shard_task = real
    return {"shards": done, "fan_out_s": fan_out_s, "flow_s": flow_s,
            "ms_per_shard": 1000 * fan_out_s / done}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,3000", help="shard counts, comma-separated")
    parser.add_argument("--quick", action="store_true", help="300 shards")
    args = parser.parse_args(argv)
    sizes = [300] if args.quick else [int(s) for s in args.sizes.split(",")]
    facts = machine_facts()
    print_machine(facts)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.update({"PREFECT_HOME": tmp, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                           "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_ENABLED": "false",
                           "PREFECT_LOGGING_LEVEL": "WARNING"})  # fmt: skip
        from prefect.testing.utilities import prefect_test_harness

        with prefect_test_harness(server_startup_timeout=120):
            results = [measure(n, str(Path(tmp) / "out")) for n in sizes]
    rows = [
        [f"{r['shards']:,}", f"{r['fan_out_s']:.1f}", f"{r['ms_per_shard']:.1f}"] for r in results
    ]
    print_table(["shards", "fan-out seconds", "ms per shard"], rows)
    worst = max(r["ms_per_shard"] for r in results)
    print(
        f"target (< {TARGET_MS:.0f} ms per shard): {'met' if worst < TARGET_MS else 'NOT met'} (worst {worst:.1f} ms)"
    )
    write_result("fan_out", {"results": results}, facts=facts)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
