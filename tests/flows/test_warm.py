"""`editflow warm`: commands handed to a warm worker run in its forked children, with the same results and
exit statuses as in their own process; without a live worker they run in their own process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq

from flows.cli import main

from .conftest import demo_rows, run_args, scene_files


def _env(sock) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.getcwd(), "EDITFLOW_WARM_SOCKET": str(sock),
            "OMP_NUM_THREADS": "1", "EDITFLOW_PROGRESS": "0"}  # fmt: skip


def _cli(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """`editflow ARGV` as the program, in a new process (the hand-over happens only there)."""
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *argv], capture_output=True, text=True, timeout=300, env=env
    )  # fmt: skip


def _wait_ready(worker: subprocess.Popen, log, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while "ready in" not in log.read_text():
        assert worker.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.2)


def _assets(out) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "assets").glob("*.png"))}


def test_a_run_through_the_warm_worker_matches_a_direct_run(prefect_server, flow_model, tmp_path):
    sock, log = tmp_path / "w.sock", tmp_path / "worker.log"
    env = _env(sock)
    with log.open("w") as stderr:  # the worker imports while the direct run below works
        worker = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "warm", "--no-server"], env=env, stderr=stderr
        )  # fmt: skip
    try:
        manifest = tmp_path / "one.parquet"
        pq.write_table(pa.Table.from_pylist(demo_rows(scene_files(tmp_path, 1))[:1]), manifest)
        argv = [*run_args(manifest, tmp_path / "direct", flow_model, shard_size=1, run_id="r1"), "--threads", "1"]  # fmt: skip
        assert main(argv) == 0
        _wait_ready(worker, log)
        assert os.stat(sock).st_mode & 0o777 == 0o600

        argv = [*run_args(manifest, tmp_path / "warm", flow_model, shard_size=1, run_id="r1"), "--threads", "1"]  # fmt: skip
        done = _cli(["-v", *argv], env)
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"warm worker {worker.pid} at {sock} runs this command in process" in done.stderr
        assert "run r1: 1 succeeded, 0 failed, 0 skipped (of 1)" in done.stdout
        direct, warm = _assets(tmp_path / "direct"), _assets(tmp_path / "warm")
        assert len(direct) == 1 and warm == direct  # the same edit ids and the same pixels

        argv = run_args(manifest, tmp_path / "stopped", flow_model, shard_size=1, run_id="r2")
        client = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "-v", *argv], env=env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        first = client.stderr.readline()
        assert "runs this command in process" in first, first
        client.send_signal(signal.SIGINT)  # Ctrl-C at the command: forwarded to its process
        _, err = client.communicate(timeout=120)
        assert client.returncode == 130 and "editflow: interrupted" in err, first + err

        done = _cli(["run", "nosuch.parquet", "--out", str(tmp_path / "x")], env)
        assert done.returncode == 2 and "no manifest file or folder at" in done.stdout + done.stderr
        done = _cli(["-v", "run", "nosuch.parquet", "--out", str(tmp_path / "x")], env | {"EDITFLOW_WARM": "0"})  # fmt: skip
        assert done.returncode == 2 and "warm worker" not in done.stderr  # disabled: runs here

        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=60) == 0
        assert not sock.exists()  # stopped: its socket removed
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()


def test_a_stale_or_foreign_socket_path_falls_back_to_running_here(tmp_path):
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(stale))  # bound, never listening, closed: what a killed worker leaves
    done = _cli(["-v", "run", "nosuch.parquet", "--out", str(tmp_path / "x")], _env(stale))
    assert done.returncode == 2 and "no manifest file or folder at" in done.stdout + done.stderr
    assert f"no warm worker answers at {stale}" in done.stderr
    plain = tmp_path / "plain.sock"
    plain.write_text("not a socket")
    done = _cli(["-v", "run", "nosuch.parquet", "--out", str(tmp_path / "x")], _env(plain))
    assert (
        done.returncode == 2 and f"ignoring {plain}: not a socket owned by this user" in done.stderr
    )
