"""Injected faults: kills and signals mid-run, S3 errors and lost replies, damaged cache entries,
racing runs and run ids, read-only and full output locations. Each ends with every edit written
exactly once and nothing written earlier rewritten (compared by digest and inode, or ETag)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from flows.cli import main
from tests.flows.conftest import demo_rows, keys_under, put, scene_png, write_manifest

from .helpers import (
    alive,
    children,
    cli_env,
    digests,
    one_row,
    results,
    scene_files,
    start_cli,
    wait_for,
    write_rows,
)

pytestmark = pytest.mark.fault


def _run(argv, capsys) -> tuple[int, str]:
    code = main(argv)
    cap = capsys.readouterr()
    return code, cap.out + cap.err


def _sidecars(out: Path) -> list[Path]:
    return sorted((out / "assets").glob("*.json"))


def _tmp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".tmp-" in p.name]


def _check_once(out: Path, expected: int, before: dict, tally, *, killed: bool = False) -> None:
    """Every edit written exactly once; files present before are unchanged (digest and inode).
    No temporary file is left, except by a process killed mid-write: then it is hidden and never listed."""
    after = digests(out)
    sides = _sidecars(out)
    images = [p for p in (out / "assets").iterdir() if p.suffix == ".png"]
    lost = max(0, expected - len(sides))
    duplicated = max(0, len(images) - expected)
    rewritten = sum(1 for k, v in before.items() if after.get(k) != v)
    tally.add(lost=lost, duplicated=duplicated, rewritten=rewritten)
    assert (lost, duplicated, rewritten) == (0, 0, 0)
    if killed:
        from storage.local import LocalStore

        assert all(p.name.startswith(".") for p in _tmp_files(out))
        assert not [k for k in LocalStore(out).list() if ".tmp-" in k]
    else:
        assert not _tmp_files(out)


# ---- killed and interrupted runs (the CLI as a program: its own temporary Prefect server)
def _start(tmp_path: Path, flow_model: str, run_id: str) -> tuple[subprocess.Popen, Path, Path]:
    images = scene_files(tmp_path / "img", 3)
    manifest = write_rows(tmp_path / "m.parquet", demo_rows(images))
    out = tmp_path / "out"
    env = cli_env(PREFECT_HOME=str(tmp_path / "prefect-home"))
    args = [
        "run",
        manifest,
        "--out",
        str(out),
        "--model",
        flow_model,
        "--shard-size",
        "3",
        "--run-id",
        run_id,
    ]
    proc = start_cli(args, env, tmp_path / "cli.log")
    assert wait_for(lambda: len(_sidecars(out)) >= 1 or proc.poll() is not None, 240), (
        tmp_path / "cli.log"
    ).read_text()
    assert proc.poll() is None, "the run finished before it could be interrupted"
    return proc, out, tmp_path / "cli.log"


def _server_pids(pid: int) -> list[int]:
    found = []
    for c in children(pid):
        try:
            if b"prefect.server.api.server" in Path(f"/proc/{c}/cmdline").read_bytes():
                found.append(c)
        except OSError:
            pass
    return found


def test_sigkill_mid_shard_then_rerun_loses_and_rewrites_nothing(
    prefect_server, flow_model, tmp_path, capsys, tally
):
    proc, out, log = _start(tmp_path, flow_model, "k1")
    servers = _server_pids(proc.pid)
    assert servers, "the CLI started no temporary Prefect server of its own"
    proc.kill()
    proc.wait(30)
    assert wait_for(lambda: not any(alive(p) for p in servers), 15), (
        "the temporary Prefect server outlived SIGKILL"
    )
    before = digests(out)
    code, text = _run(["rerun", "k1", "--out", str(out), "--model", flow_model], capsys)
    assert code == 0, text + log.read_text()
    rows = results(out, "k1")
    assert sorted(r["status"] for r in rows).count("failed") == 0 and len(rows) == 9
    _check_once(out, 9, before, tally, killed=True)


@pytest.mark.parametrize(
    "sig, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["sigterm", "ctrl-c"]
)
def test_signal_exits_promptly_and_stops_the_server(
    prefect_server, flow_model, tmp_path, capsys, tally, sig, status
):
    proc, out, log = _start(tmp_path, flow_model, "s1")
    servers = _server_pids(proc.pid)
    assert servers
    t0 = time.monotonic()
    if sig == signal.SIGINT:
        os.killpg(proc.pid, sig)  # a terminal's Ctrl-C goes to the foreground process group
    else:
        proc.send_signal(sig)
    code = proc.wait(60)
    took = time.monotonic() - t0
    text = log.read_text()
    assert code == status, text
    assert took < 15, f"took {took:.1f}s to exit"
    assert "interrupted" in text and "Traceback" not in text
    assert wait_for(lambda: not any(alive(p) for p in servers), 10), (
        "the temporary Prefect server outlived the CLI"
    )
    before = digests(out)
    assert _run(["rerun", "s1", "--out", str(out), "--model", flow_model], capsys)[0] == 0
    _check_once(
        out, 9, before, tally, killed=True
    )  # the CLI exits without waiting for a write in flight


# ---- S3 5xx, dropped connections and lost replies through a fault proxy
def test_s3_errors_and_lost_replies_through_a_proxy(
    prefect_server, s3_server, s3_client, s3_bucket, flow_model, tally
):
    from flows.bulk_edit import bulk_edit
    from storage.s3 import clear_client_cache
    from tasks.options import RunOptions

    from .faultproxy import FaultProxy

    images = [f"{s3_bucket}/images/scene-{i}.png" for i in range(3)]
    for i, uri in enumerate(images):
        put(s3_client, uri, scene_png(i))
    manifest = f"{s3_bucket}/manifests/m.parquet"
    write_manifest(s3_client, manifest, demo_rows(images))
    proxy = FaultProxy(s3_server, error=0.08, drop=0.04, lost_reply=0.08, seed=7)
    try:
        clear_client_cache()
        out = f"{s3_bucket}/out"
        options = RunOptions(out=out, model=flow_model, s3_endpoint=proxy.url, shard_size=3)
        summary = bulk_edit(manifest, options, run_id="p1")
    finally:
        proxy.close()
        clear_client_cache()
    assert proxy.counts["error"] and proxy.counts["drop"] and proxy.counts["lost_reply"], (
        proxy.counts
    )
    objs = keys_under(s3_client, f"{out}/assets/")
    sides = [k for k in objs if k.endswith(".json")]
    pngs = [k for k in objs if k.endswith(".png")]
    lost, duplicated = max(0, 9 - len(sides)), max(0, len(pngs) - 9)
    tally.add(lost=lost, duplicated=duplicated)
    assert (lost, duplicated) == (0, 0)
    # a fresh output: a sidecar PUT whose reply was lost is a success, never "skipped"
    assert summary["counts"] == {"succeeded": 9, "failed": 0, "skipped": 0}, (
        summary["counts"],
        proxy.counts,
    )


# ---- damaged cache entries of each kind
def _populated(tmp_path: Path, flow_model: str, capsys, features: bool) -> tuple[Path, str, Path]:
    [img] = scene_files(tmp_path / "img", 1)
    out = tmp_path / "out"
    extra = ["--cache-features"] if features else []
    assert (
        _run(
            [
                "run",
                write_rows(tmp_path / "m1.parquet", [one_row(img)]),
                "--out",
                str(out),
                "--model",
                flow_model,
                *extra,
            ],
            capsys,
        )[0]
        == 0
    )
    return out, img, tmp_path / "m2.parquet"


def _damage(path: Path, kind: str) -> None:
    from storage.cache import seal

    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    if kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "zero-bytes":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(b"this is not a safetensors file at all" * 10)
    elif kind == "header-bit":
        header = bytearray(data)
        i = header.index(b"source_prompt", 8, 8 + n)
        header[i] = ord("t")  # still JSON, other facts: only the checksum can tell
        path.write_bytes(bytes(header))
    elif kind == "no-checksum":  # an entry written by an older editflow (or by hand)
        header = json.loads(data[8 : 8 + n])
        header["__metadata__"].pop("editflow_sha256")
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        path.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + n :])
    elif kind == "other-facts":  # a well-sealed entry made for another prompt
        header = json.loads(data[8 : 8 + n])
        facts = json.loads(header["__metadata__"]["facts"])
        facts["source_prompt"] = "something else"
        header["__metadata__"]["facts"] = json.dumps(facts, sort_keys=True)
        header["__metadata__"].pop("editflow_sha256")
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        path.write_bytes(seal(len(text).to_bytes(8, "little") + text + data[8 + n :]))
    elif kind == "tensor-bit":
        b = bytearray(data)
        b[-3] ^= 0x40
        path.write_bytes(bytes(b))
    else:
        raise AssertionError(kind)


@pytest.mark.parametrize(
    "cache, kind",
    [
        ("inversions", k)
        for k in ("truncated", "zero-bytes", "garbage", "header-bit", "no-checksum", "other-facts")
    ]
    + [("features", "tensor-bit"), ("features", "truncated")],
)
def test_damaged_cache_entry_is_replaced(
    prefect_server, flow_model, tmp_path, capsys, editflow_log, cache, kind
):
    from storage.cache import unseal

    out, img, m2 = _populated(tmp_path, flow_model, capsys, features=cache == "features")
    [entry] = sorted((out / "cache" / cache).rglob("*.safetensors"))
    _damage(entry, kind)
    second = [one_row(img, "a red circle on a white background")]
    code, text = _run(
        [
            "run",
            write_rows(m2, second),
            "--out",
            str(out),
            "--model",
            flow_model,
            "--run-id",
            "after",
            *(["--cache-features"] if cache == "features" else []),
        ],
        capsys,
    )
    assert code == 0, text
    assert "recomputing" in editflow_log.text
    [fixed] = sorted((out / "cache" / cache).rglob("*.safetensors"))
    unseal(fixed.read_bytes())  # a sound entry again
    assert [r["status"] for r in results(out, "after")] == ["succeeded"]


# ---- racing runs and run ids
def test_two_racing_runs_write_each_edit_once(prefect_server, flow_model, tmp_path, tally):
    from flows.bulk_edit import bulk_edit
    from tasks.options import RunOptions

    images = scene_files(tmp_path / "img", 3)
    manifest = write_rows(tmp_path / "m.parquet", demo_rows(images))
    out = tmp_path / "out"
    summaries: dict[str, dict] = {}

    def go(run_id: str) -> None:
        options = RunOptions(out=str(out), model=flow_model, shard_size=3)
        summaries[run_id] = bulk_edit(manifest, options, run_id=run_id)

    threads = [threading.Thread(target=go, args=(r,)) for r in ("ra", "rb")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert set(summaries) == {"ra", "rb"}
    succeeded = sum(s["counts"]["succeeded"] for s in summaries.values())
    assert all(s["counts"]["failed"] == 0 for s in summaries.values())
    tally.add(duplicated=max(0, succeeded - 9), lost=max(0, 9 - succeeded))
    assert succeeded == 9  # each edit written by exactly one of the runs
    _check_once(out, 9, {}, tally)


def test_racing_plans_of_one_run_id_have_one_winner(tmp_path):
    from tasks.errors import RunExists
    from tasks.options import RunOptions
    from tasks.planning import plan_run

    images = scene_files(tmp_path / "img", 2)
    manifests = [
        write_rows(tmp_path / f"m{i}.parquet", [one_row(images[i], edit_id=f"e{i}")])
        for i in range(2)
    ]
    options = RunOptions(out=str(tmp_path / "out"))
    outcome: list[str] = []
    barrier = threading.Barrier(2)

    def go(m: str) -> None:
        barrier.wait()
        try:
            plan_run(m, options, run_id="same")
            outcome.append("planned")
        except RunExists:
            outcome.append("refused")

    threads = [threading.Thread(target=go, args=(m,)) for m in manifests]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(outcome) == ["planned", "refused"]
    plan = json.loads((tmp_path / "out" / "runs" / "same" / "plan.json").read_text())
    assert plan["rows"] == 1 and plan["manifest"] in manifests


# ---- read-only and full output locations
def _mount_tmpfs(where: Path, options: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True
        ).returncode
        == 0
    )


def _umount(where: Path) -> None:
    subprocess.run(["umount", "-l", str(where)], capture_output=True)


@pytest.fixture
def readonly_out(tmp_path):
    where = tmp_path / "ro"
    if _mount_tmpfs(where, "ro,size=1m"):
        yield where
        _umount(where)
    else:  # not root: permissions are enough
        where.chmod(0o555)
        yield where
        where.chmod(0o755)


def test_read_only_output_is_one_line_and_exit_3(
    prefect_server, flow_model, tmp_path, capsys, readonly_out
):
    [img] = scene_files(tmp_path / "img", 1)
    m = write_rows(tmp_path / "m.parquet", [one_row(img)])
    code, text = _run(["run", m, "--out", str(readonly_out / "out"), "--model", flow_model], capsys)
    assert code == 3, text
    assert str(readonly_out) in text and ("read-only" in text or "permission denied" in text)
    assert len(text.strip().splitlines()) == 1 and "Traceback" not in text


@pytest.fixture
def full_disk(tmp_path):
    """A 96 KiB tmpfs: room for the plan, not for the outputs (needs root to mount; see the notes)."""
    where = tmp_path / "full"
    if not _mount_tmpfs(where, "size=96k"):
        pytest.skip("cannot mount a small tmpfs here (not root); the full-disk fault needs one")
    yield where
    _umount(where)


def test_full_disk_leaves_no_temporary_files_and_prints_a_summary(
    prefect_server, flow_model, tmp_path, capsys, full_disk
):
    images = scene_files(tmp_path / "img", 3)
    m = write_rows(tmp_path / "m.parquet", demo_rows(images))
    out = full_disk / "out"
    code, text = _run(
        ["run", m, "--out", str(out), "--model", flow_model, "--shard-size", "3", "--run-id", "f1"],
        capsys,
    )
    assert code in (1, 3), text
    assert "no space left" in text.lower()
    assert "run f1:" in text  # the summary, even when summary.json could not be written
    assert not _tmp_files(full_disk), _tmp_files(full_disk)
    assert not [p for p in full_disk.rglob("*") if p.is_file() and p.stat().st_size == 0]
