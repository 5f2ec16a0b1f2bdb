"""Start-up of the `editflow` command: whole-process wall time of what a user runs first.

    python -m benchmarks.startup                        # this checkout's code, 3 repeats
    python -m benchmarks.startup --code /tmp/base --label before   # another tree's (README row 8: `git archive bfd0366`)
    python -m benchmarks.startup --repeats 1 --label before

Each command is ``python -m flows.cli ...`` in a fresh process with the code root as its working
directory (the demo manifest's image paths are relative to it), no PREFECT_API_URL (so whatever the
code does without a configured server: the temporary server), ``OMP_NUM_THREADS=1``, a fresh
``PREFECT_HOME`` per benchmark run (its database migrated by the first command, which is not timed).

Rows (issue 20, targets on a 2-core machine):

* ``run nosuch.parquet``: time to the exit (status 2, the manifest named): < 3 s.
* no-op run of the demo: the demo run once into an output root (not timed), then again into the same
  root: everything finished; < 6 s.
* 1-edit run (the demo's first row, a new output root each time): wall time, and the part of it outside
  the editing itself (wall minus the shard's read + inversion + edit + write seconds from the run's
  summary): < 5 s; and the same with a Prefect server already running (PREFECT_API_URL set).
* through a warm worker (``editflow warm`` started once, with its own Prefect server; not timed: its
  start-up is printed): ``run nosuch.parquet``, the no-op run and the 1-edit run again, each command
  handed to the worker's forked child (``--warm-only``: these rows alone).

The medians of `--repeats` runs; the machine's load average is printed with each row.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (  # noqa: E402
    REPO_ROOT,
    machine_facts,
    print_machine,
    print_table,
    write_result,
)

TARGETS = {"nosuch": 3.0, "noop": 6.0, "one_outside": 5.0}
EDIT_STAGES = ("shards_read", "shards_inversion", "shards_edit", "shards_write")


def _cli(code: Path, argv: list[str], env: dict[str, str]) -> tuple[float, int, str]:
    t0 = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", *argv], cwd=code, env=env, capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip
    return time.perf_counter() - t0, done.returncode, done.stdout + done.stderr


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def _summary(out: Path) -> dict:
    [path] = sorted(out.glob("runs/*/summary.json"))
    return json.loads(path.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--code", type=Path, default=REPO_ROOT, help="the code root to time")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--label", default="", help="a name for this code in the result (e.g. before)")
    ap.add_argument("--warm-only", action="store_true", help="only the rows through a warm worker")
    args = ap.parse_args()
    code = args.code.resolve()
    facts = machine_facts()
    print_machine(facts)
    with tempfile.TemporaryDirectory(prefix="editflow-startup-") as tmp_name:
        tmp = Path(tmp_name)
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("PREFECT_API_URL", "EDITFLOW_WARM_SOCKET")
        }
        env["EDITFLOW_WARM"] = "0"  # each command in its own process, but in the warm rows
        env |= {"PREFECT_HOME": str(tmp / "prefect-home"), "OMP_NUM_THREADS": "1",
                "EDITFLOW_PROGRESS": "0", "PYTHONPATH": str(code), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}  # fmt: skip
        demo = code / "manifests" / "examples" / "demo.parquet"
        import pyarrow.parquet as pq

        one = tmp / "one.parquet"
        pq.write_table(pq.read_table(demo).slice(0, 1), one)
        # untimed: the demo once (its outputs make the no-op run's root; Prefect's database migrated)
        seconds, status, text = _cli(code, ["run", str(demo), "--out", str(tmp / "demo")], env)
        assert status == 0, text[-2000:]
        print(f"demo run (untimed setup): {seconds:.1f}s")
        rows, samples = [], {}
        if not args.warm_only:
            rows += _cold_rows(code, env, tmp, demo, one, args.repeats, samples)
        rows += _warm_rows(code, env, tmp, demo, one, args.repeats, samples)

    print_table(
        ("command", "median s", "target s", "load (1 min)"),
        rows,
        title=f"start-up, code at {code} {args.label}".rstrip(),
    )
    result = {
        "code": str(code),
        "label": args.label,
        "repeats": args.repeats,
        "rows": [
            {"command": r[0], "median_s": round(r[1], 2), "target_s": r[2], "load": r[3]}
            for r in rows
        ],
        "samples": samples,
    }
    name = "startup" + (f"_{args.label}" if args.label else "")
    write_result(name, result, facts=facts)


def _outside(out: Path, seconds: float) -> float:
    """A run's wall seconds outside the editing: minus the shard's read, inversion, edit, write."""
    secs = _summary(out)["seconds"]
    return seconds - sum(secs.get(k, 0.0) for k in EDIT_STAGES)


def _warm_rows(code, env, tmp, demo, one, repeats, samples) -> list[tuple]:
    """The same commands handed to a warm worker (`editflow warm`, with its own Prefect server)."""
    env = env | {"EDITFLOW_WARM_SOCKET": str(tmp / "warm.sock"), "EDITFLOW_WARM": "1"}
    log = tmp / "warm.log"
    t0 = time.perf_counter()
    with log.open("w") as stderr:
        worker = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "warm"], cwd=code, env=env, stderr=stderr
        )  # fmt: skip
    rows = []
    try:
        while "ready in" not in log.read_text():
            assert worker.poll() is None, log.read_text()[-2000:]
            time.sleep(0.1)
        print(f"warm worker ready after {time.perf_counter() - t0:.1f}s (untimed setup)")
        nosuch, noop, walls, outside = [], [], [], []
        for _ in range(repeats):
            seconds, status, text = _cli(
                code, ["run", "nosuch.parquet", "--out", str(tmp / "x")], env
            )
            assert status == 2 and "nosuch.parquet" in text, text[-2000:]
            nosuch.append(seconds)
        for _ in range(repeats):
            seconds, status, text = _cli(code, ["run", str(demo), "--out", str(tmp / "demo")], env)
            assert status == 0 and "nothing to do" in text, text[-2000:]
            noop.append(seconds)
        for i in range(repeats):
            out = tmp / f"warm-{i}"
            seconds, status, text = _cli(code, ["-v", "run", str(one), "--out", str(out)], env)
            assert status == 0 and "warm worker" in text, text[-2000:]
            walls.append(seconds)
            outside.append(_outside(out, seconds))
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)
    rows.append(("warm: run nosuch.parquet (exit 2)", statistics.median(nosuch), TARGETS["nosuch"], _load()))  # fmt: skip
    rows.append(("warm: no-op run of the demo", statistics.median(noop), TARGETS["noop"], _load()))
    rows.append(("warm: 1-edit run, wall", statistics.median(walls), None, _load()))
    rows.append(("warm: 1-edit run, outside the editing", statistics.median(outside), TARGETS["one_outside"], _load()))  # fmt: skip
    samples |= {"warm_nosuch": nosuch, "warm_noop": noop, "warm_one_wall": walls, "warm_one_outside": outside}  # fmt: skip
    return rows


def _cold_rows(code, env, tmp, demo, one, repeats, samples) -> list[tuple]:
    """Each command in a fresh process: the temporary server, then with a server already running."""
    rows = []
    nosuch = []
    for _ in range(repeats):
        seconds, status, text = _cli(code, ["run", "nosuch.parquet", "--out", str(tmp / "x")], env)
        assert status == 2 and "nosuch.parquet" in text, text[-2000:]
        nosuch.append(seconds)
    rows.append(
        ("run nosuch.parquet (exit 2)", statistics.median(nosuch), TARGETS["nosuch"], _load())
    )

    noop = []
    for _ in range(repeats):
        seconds, status, text = _cli(code, ["run", str(demo), "--out", str(tmp / "demo")], env)
        assert status == 0, text[-2000:]
        noop.append(seconds)
    rows.append(("no-op run of the demo", statistics.median(noop), TARGETS["noop"], _load()))

    walls, outside = [], []
    for i in range(repeats):
        out = tmp / f"one-{i}"
        seconds, status, text = _cli(code, ["run", str(one), "--out", str(out)], env)
        assert status == 0, text[-2000:]
        walls.append(seconds)
        outside.append(_outside(out, seconds))
    rows.append(("1-edit run, wall", statistics.median(walls), None, _load()))
    rows.append(("1-edit run, outside the editing", statistics.median(outside), TARGETS["one_outside"], _load()))  # fmt: skip

    # the same with a Prefect server already running (PREFECT_API_URL), as `editflow serve` or
    # `prefect server start` leave one
    from flows.server import start_temporary_server, stop_temporary_server

    saved = dict(os.environ)
    os.environ.update({k: v for k, v in env.items() if k.startswith("PREFECT")})
    os.environ.pop("PREFECT_API_URL", None)
    url = start_temporary_server()
    os.environ.clear()
    os.environ.update(saved)
    served = []
    try:
        for i in range(repeats):
            out = tmp / f"served-{i}"
            argv = ["run", str(one), "--out", str(out)]
            seconds, status, text = _cli(code, argv, env | {"PREFECT_API_URL": url})
            assert status == 0, text[-2000:]
            served.append(_outside(out, seconds))
    finally:
        stop_temporary_server()
    rows.append(("1-edit run, outside the editing, server running", statistics.median(served), TARGETS["one_outside"], _load()))  # fmt: skip
    samples |= {"nosuch": nosuch, "noop": noop, "one_wall": walls, "one_outside": outside,
                "one_outside_server_running": served}  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
