"""Hostile storage inputs through the CLI (issue 19, storage side): sources that are not regular files
or are too large, percent-encoded file URIs, links planted under --out, a tampered cache entry.
Each failed on the code before the fix (a FIFO hung the run: here the subprocess's timeout fails it)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from flows.cli import main

from .helpers import cli_env, one_row, results, scene_files, start_cli, write_rows

# the CLI's own temporary Prefect server starts in 15-60 s on a loaded 2-core box
RUN_TIMEOUT_S = 420
CAP = 1_000_000  # --max-source-bytes of the subprocess run: above a scene PNG, below `big.png`


def _run(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    cap = capsys.readouterr()
    return code, cap.out + cap.err


# ---- sources: one CLI run (a subprocess, so a hang fails by timeout) with every kind of bad source
@pytest.fixture(scope="module")
def bad_sources_run(tmp_path_factory, flow_model) -> dict:
    tmp = tmp_path_factory.mktemp("bad-sources")
    good, spaced = scene_files(tmp / "img", 2)
    spaced_path = tmp / "img" / "scene one.png"  # a space: Path.as_uri() writes %20
    os.rename(spaced, spaced_path)
    os.mkfifo(tmp / "img" / "fifo.png")
    (tmp / "img" / "big.png").write_bytes(Path(good).read_bytes() + b"\0" * CAP)
    rows = {
        "good": good,
        "encoded": spaced_path.as_uri(),
        "fifo": str(tmp / "img" / "fifo.png"),
        "zero": "/dev/zero",
        "big": str(tmp / "img" / "big.png"),
    }
    manifest = write_rows(
        tmp / "m.parquet", [one_row(uri, edit_id=edit_id) for edit_id, uri in rows.items()]
    )
    out = tmp / "out"
    args = ["run", manifest, "--out", str(out), "--model", flow_model, "--run-id", "bad",
            "--max-source-bytes", str(CAP)]  # fmt: skip
    log = tmp / "cli.log"
    t0 = time.monotonic()
    proc = start_cli(args, cli_env(PREFECT_HOME=str(tmp / "prefect-home")), log)
    try:
        code = proc.wait(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()
        pytest.fail(f"the run hung for {RUN_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")
    return {
        "code": code,
        "seconds": time.monotonic() - t0,
        "log": log.read_text(),
        "rows": {r["edit_id"]: r for r in results(out, "bad")},
        "uris": rows,
        "out": out,
    }


@pytest.mark.bad_input
def test_fifo_source_is_a_row_error_and_good_rows_still_run(bad_sources_run):
    run = bad_sources_run
    rows = run["rows"]
    assert run["code"] == 1, run["log"][-3000:]
    assert rows["good"]["status"] == "succeeded", rows["good"]
    assert rows["fifo"]["status"] == "failed"
    assert f"{run['uris']['fifo']} is a FIFO, not a regular file" in rows["fifo"]["error"]
    assert "image_uri" in rows["fifo"]["error"]


@pytest.mark.bad_input
def test_dev_zero_is_refused_quickly(bad_sources_run):
    row = bad_sources_run["rows"]["zero"]
    assert row["status"] == "failed"
    assert "image_uri" in row["error"]
    assert "/dev/zero is a character device, not a regular file" in row["error"]


@pytest.mark.bad_input
def test_source_over_the_byte_cap_is_a_row_error(bad_sources_run):
    row = bad_sources_run["rows"]["big"]
    assert row["status"] == "failed"
    size = Path(bad_sources_run["uris"]["big"]).stat().st_size
    assert f"holds {size} bytes, over the cap of {CAP} bytes" in row["error"]
    assert "image_uri" in row["error"]


@pytest.mark.bad_input
def test_percent_encoded_file_uri_is_read(bad_sources_run):
    row = bad_sources_run["rows"]["encoded"]
    assert "%20" in bad_sources_run["uris"]["encoded"]
    assert row["status"] == "succeeded", row


# ---- links planted under --out
def _world(tmp_path: Path) -> tuple[str, Path, Path]:
    [img] = scene_files(tmp_path / "img", 1)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    return img, tmp_path / "out", elsewhere


@pytest.mark.security
def test_symlinked_sidecar_is_not_adopted(prefect_server, flow_model, tmp_path, capsys):
    img, out, elsewhere = _world(tmp_path)
    planted = elsewhere / "e1.json"
    planted.write_text(json.dumps({"edit_id": "e1", "output_uri": str(elsewhere / "e1.png")}))
    (out / "assets").mkdir(parents=True)
    (out / "assets" / "e1.json").symlink_to(planted)
    m = write_rows(tmp_path / "m.parquet", [one_row(img, edit_id="e1")])
    code, text = _run(["run", m, "--out", str(out), "--model", flow_model, "--run-id", "s"], capsys)
    assert code == 0, text
    [row] = results(out, "s")
    assert row["status"] == "succeeded", row  # edited, not "skipped, finished earlier"
    assert (out / "assets" / "e1.png").is_file()
    assert not (out / "assets" / "e1.json").is_symlink()
    assert json.loads((out / "assets" / "e1.json").read_text())["edit_id"] == "e1"
    assert sorted(p.name for p in elsewhere.iterdir()) == ["e1.json"]


@pytest.mark.security
def test_symlinked_cache_under_out_is_not_written_through(
    prefect_server, flow_model, tmp_path, capsys
):
    img, out, elsewhere = _world(tmp_path)
    out.mkdir()
    (out / "cache").symlink_to(elsewhere, target_is_directory=True)
    m = write_rows(tmp_path / "m.parquet", [one_row(img, edit_id="e1")])
    code, text = _run(["run", m, "--out", str(out), "--model", flow_model, "--run-id", "c"], capsys)
    assert list(elsewhere.rglob("*")) == []
    assert code != 0, text
    assert f"{out / 'cache'}" in text and "symbolic link" in text, text


@pytest.mark.security
def test_explicit_cache_elsewhere_works(prefect_server, flow_model, tmp_path, capsys):
    """An explicit --cache may live anywhere, and may itself be a link."""
    img, out, elsewhere = _world(tmp_path)
    (tmp_path / "cache-link").symlink_to(elsewhere, target_is_directory=True)
    cache = str(tmp_path / "cache-link")
    for run_id, target in (("c1", "a blue circle on a gray background"),
                           ("c2", "a red square on a gray background")):  # fmt: skip
        m = write_rows(tmp_path / f"{run_id}.parquet", [one_row(img, target, edit_id=run_id)])
        argv = ["run", m, "--out", str(out), "--model", flow_model, "--cache", cache, "--run-id", run_id]  # fmt: skip
        code, text = _run(argv, capsys)
        assert code == 0, text
    assert list((elsewhere / "inversions").rglob("*.safetensors"))
    assert not (out / "cache").exists()
    assert [r["cache_hit"] for r in results(out, "c2")] == [True]


@pytest.mark.security
def test_resealed_cache_entry_is_refused_with_a_key_and_recomputed(
    prefect_server, flow_model, tmp_path, capsys, editflow_log, monkeypatch
):
    from storage.cache import CACHE_KEY_ENV, seal, unseal

    img, out, _ = _world(tmp_path)
    monkeypatch.setenv(CACHE_KEY_ENV, "a-test-key-of-some-length")
    m1 = write_rows(tmp_path / "m1.parquet", [one_row(img, edit_id="k1")])
    code, text = _run(["run", m1, "--out", str(out), "--model", flow_model], capsys)
    assert code == 0, text
    [entry] = sorted((out / "cache" / "inversions").rglob("*.safetensors"))
    good = entry.read_bytes()
    forged = bytearray(good)
    forged[-3] ^= 0x40  # an altered tensor...
    with monkeypatch.context() as m:
        m.delenv(CACHE_KEY_ENV)
        entry.write_bytes(seal(bytes(forged)))  # ...re-sealed by a writer without the key
        unseal(entry.read_bytes())  # its checksum is right: only the HMAC can tell
    m2 = write_rows(
        tmp_path / "m2.parquet", [one_row(img, "a red square on a gray background", edit_id="k2")]
    )
    code, text = _run(
        ["run", m2, "--out", str(out), "--model", flow_model, "--run-id", "after"], capsys
    )
    assert code == 0, text
    assert "not trusted" in editflow_log.text and "recomputing" in editflow_log.text
    [row] = results(out, "after")
    assert row["status"] == "succeeded" and row["cache_hit"] is False
    assert unseal(entry.read_bytes()) == good  # recomputed, and sealed with the key again


@pytest.mark.security
def test_dask_workers_seal_with_the_key(prefect_server, flow_model, tmp_path, capsys, monkeypatch):
    """The key is read where the cache is used: worker processes of editflow's local cluster inherit it."""
    from storage.cache import CACHE_KEY_ENV, MAC_KEY, unseal

    img, out, _ = _world(tmp_path)
    monkeypatch.setenv(CACHE_KEY_ENV, "a-test-key-of-some-length")
    m = write_rows(tmp_path / "m.parquet", [one_row(img, edit_id="d1")])
    argv = ["run", m, "--out", str(out), "--model", flow_model, "--runner", "dask", "--dask-workers", "1"]  # fmt: skip
    code, text = _run(argv, capsys)
    assert code == 0, text
    [entry] = sorted((out / "cache" / "inversions").rglob("*.safetensors"))
    data = entry.read_bytes()
    n = int.from_bytes(data[:8], "little")
    assert MAC_KEY in json.loads(data[8 : 8 + n])["__metadata__"]
    unseal(data)  # valid for the key
