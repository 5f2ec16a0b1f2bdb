"""A real multi-process Dask cluster started with Dask's own CLI, as on several machines: a scheduler and
two workers (`dask worker ADDRESS --resources GPU=1`), each its own process in its own empty working
directory, configured only by environment variables, storage on S3 (moto); `editflow run --runner dask
--dask-address ... --dask-gpu` in a process of its own. One worker is SIGKILLed while shards run.

The workers get two threads each so that the GPU resource, not the thread count, is what keeps a
worker to one shard at a time; ``--no-nanny`` so that a killed worker stays dead (a nanny would
restart it)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from storage.testing import FAKE_AWS_ENV

from .conftest import get, keys_under, put, scene_png, write_manifest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SOURCES, TARGETS, SHARD = 6, 2, 2  # 12 edits in 6 shards
TARGET_PROMPTS = ("a blue circle on a gray background", "a red square on a gray background")
DEADLINE_S = 240  # the whole run, on a loaded 2-core machine; it takes well under half of this
CLOCK_SLACK_S = 0.05  # see the one-at-a-time check below


def _env(home: Path) -> dict[str, str]:
    """What a worker on another machine would be given: environment variables only."""
    return {
        "PATH": f"{BIN}:/usr/bin:/bin",
        "HOME": str(home),
        "PYTHONPATH": str(REPO),  # the checkout (a machine would have editflow installed)
        "PREFECT_API_URL": os.environ["PREFECT_API_URL"],
        "PREFECT_HOME": str(home / ".prefect"),
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "OMP_NUM_THREADS": "1",
        "DASK_DISTRIBUTED__WORKER__DAEMON": "false",
        **FAKE_AWS_ENV,
    }


def _start(cmd: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    cwd.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, cwd=cwd, env=_env(cwd), stdout=out, stderr=subprocess.STDOUT)


def _wait(what: str, check, timeout: float, procs: list[subprocess.Popen], logs: list[Path]):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = check()
        if value:
            return value
        for p, log in zip(procs, logs):
            if p.poll() is not None:
                pytest.fail(
                    f"{what}: {p.args[:3]} exited {p.returncode}:\n{log.read_text()[-3000:]}"
                )
        time.sleep(0.1)
    pytest.fail(f"{what}: not within {timeout:.0f} s")


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL is not ignored
            pass


def _objects(s3_client, prefix: str) -> dict[str, tuple[str, str]]:
    """key -> (ETag, LastModified) of every object under an s3:// prefix."""
    bucket, key = prefix[len("s3://") :].split("/", 1)
    found = {}
    for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key):
        for obj in page.get("Contents", []):
            found[obj["Key"]] = (obj["ETag"], obj["LastModified"].isoformat())
    return found


@pytest.mark.slow
def test_run_on_a_cli_started_cluster_survives_losing_a_worker(
    prefect_server, s3_server, s3_client, s3_bucket, flow_model, tmp_path
):
    from distributed import Client, get_task_stream

    images = [f"{s3_bucket}/images/scene-{i}.png" for i in range(SOURCES)]
    rows = []
    for i, uri in enumerate(images):
        put(s3_client, uri, scene_png(i))
        for j in range(TARGETS):
            rows.append({"image_uri": uri, "source_prompt": "a red circle on a gray background",
                         "target_prompt": TARGET_PROMPTS[j],
                         "method": "pnp", "num_steps": 2})  # fmt: skip
    manifest, out, run_id = f"{s3_bucket}/manifest.parquet", f"{s3_bucket}/out", "cluster"
    write_manifest(s3_client, manifest, rows)

    procs: list[subprocess.Popen] = []
    logs: list[Path] = []
    client = None
    try:
        sched_file = tmp_path / "scheduler.json"
        logs.append(tmp_path / "scheduler.log")
        procs.append(_start([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", "0",
                             "--no-dashboard", "--scheduler-file", str(sched_file)],
                            tmp_path / "scheduler", logs[-1]))  # fmt: skip
        _wait("scheduler", sched_file.exists, 60, procs, logs)
        address = _wait("scheduler address", lambda: json.loads(sched_file.read_text() or "{}").get("address"), 30, procs, logs)  # fmt: skip
        for i in range(2):
            logs.append(tmp_path / f"worker-{i}.log")
            procs.append(_start([str(BIN / "dask"), "worker", address, "--nthreads", "2", "--resources", "GPU=1",
                                 "--no-nanny", "--no-dashboard", "--name", f"w{i}", "--local-directory", ".",
                                 "--preload", "tasks.units"],
                                tmp_path / f"worker-{i}", logs[-1]))  # fmt: skip
        client = Client(address, timeout=30)
        with get_task_stream(client) as stream:
            # the run starts while the workers import editflow (--preload): as when a cluster scales up
            logs.append(tmp_path / "cli.log")
            cli = _start([sys.executable, "-m", "flows.cli", "run", manifest, "--out", out, "--s3-endpoint", s3_server,
                          "--model", flow_model, "--shard-size", str(SHARD), "--run-id", run_id,
                          "--runner", "dask", "--dask-address", address, "--dask-gpu"],
                         tmp_path / "cli", logs[-1])  # fmt: skip
            procs.append(cli)
            _wait(
                "2 workers", lambda: len(client.scheduler_info()["workers"]) == 2, 120, procs, logs
            )
            pids = client.run(os.getpid)  # worker address -> pid
            assert sorted(pids.values()) == sorted(p.pid for p in procs[1:3])
            results = f"{out}/runs/{run_id}/results/"

            def busy_worker_after_a_shard():
                done = [k for k in keys_under(s3_client, results) if "/shard-" in k]
                if not done or len(done) >= SOURCES - 1:
                    return None
                busy = [w for w, tasks in client.processing().items() if tasks]
                return busy[0] if busy else None

            victim = _wait("a shard finished while another runs", busy_worker_after_a_shard, DEADLINE_S, [cli], logs[-1:])  # fmt: skip
            os.kill(pids[victim], signal.SIGKILL)
            killed_at = time.time()
            at_kill = _objects(s3_client, f"{out}/assets/")
            cli.wait(timeout=DEADLINE_S)
        output = (tmp_path / "cli.log").read_text()
        assert cli.returncode == 0, output[-3000:]

        summary = json.loads(get(s3_client, f"{out}/runs/{run_id}/summary.json"))
        assert summary["counts"] == {"succeeded": SOURCES * TARGETS, "failed": 0, "skipped": 0}
        after = _objects(s3_client, f"{out}/assets/")
        images_ = [k for k in after if k.endswith(".png")]
        sidecars = [k for k in after if k.endswith(".json")]
        assert len(images_) == len(sidecars) == SOURCES * TARGETS  # none lost
        assert len(after) == 2 * SOURCES * TARGETS  # and nothing else (no duplicates, no leftovers)
        assert {
            k: after[k] for k in at_kill
        } == at_kill  # nothing written before the kill rewritten
        for key in sidecars:
            assert (
                json.loads(get(s3_client, f"{s3_bucket.split('/prefix')[0]}/{key}"))["run_id"]
                == run_id
            )

        survivor = next(w for w in pids if w != victim)
        loads = client.run(lambda: len(__import__("tasks.worker").worker._MODELS))
        assert loads == {
            survivor: 1
        }  # one model in the surviving worker's process, however many shards

        # the survivor's shards after the kill (a rescheduled shard's record may carry the start it had
        # on the killed worker, so those are left out): one at a time, though it has two threads
        tasks = [t for t in stream.data if t.get("worker") == survivor]
        spans = sorted((s["start"], s["stop"]) for t in tasks for s in t["startstops"]
                       if s["action"] == "compute" and s["start"] >= killed_at)  # fmt: skip
        assert spans
        # the worker shifts each record by its current scheduler_delay, re-estimated at every heartbeat, so
        # back-to-back shards can seem to overlap by a few ms; two shards at once would overlap by a whole
        # shard (hundreds of ms)
        assert all(a[1] <= b[0] + CLOCK_SLACK_S for a, b in zip(spans, spans[1:])), spans
    finally:
        if client is not None:
            client.close()
        _stop(procs)


def test_an_unreachable_scheduler_is_one_line_and_exit_3(tmp_path):
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", str(REPO / "manifests/examples/demo.parquet"),
         "--out", str(tmp_path / "out"), "--runner", "dask", "--dask-address", "tcp://127.0.0.1:1"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert time.monotonic() - t0 < 30
    assert proc.returncode == 3, proc.stderr
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert len(lines) == 1 and "tcp://127.0.0.1:1" in lines[0] and "Dask scheduler" in lines[0], (
        lines
    )
    assert not (tmp_path / "out").exists()


def test_check_scheduler_accepts_a_listening_address_and_names_a_bad_one():
    import socket

    from flows.runners import ClusterUnreachable, check_scheduler

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        check_scheduler(f"tcp://127.0.0.1:{server.getsockname()[1]}", timeout=5)
    with pytest.raises(ClusterUnreachable, match="not a scheduler address"):
        check_scheduler("tcp://no-port-here")
