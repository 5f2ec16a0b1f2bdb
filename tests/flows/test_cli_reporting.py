"""What the CLI tells a user about a run: failed rows in the summary, progress without a terminal,
skipped rows that join back to their images, `serve --run-id` refused, Dask's INFO lines quiet."""

from __future__ import annotations

import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows.cli import main

from .conftest import demo_rows, run_args, scene_png


def test_summary_lists_failed_rows_progress_lines_and_skipped_rows_keep_their_uris(
    prefect_server, flow_model, tmp_path, capsys, monkeypatch
):
    monkeypatch.delenv("EDITFLOW_PROGRESS", raising=False)
    image = tmp_path / "scene.png"
    image.write_bytes(scene_png(0))
    good = [
        {**r, "edit_id": f"good-{i}"}
        for i, r in enumerate(demo_rows([str(image)] * 3, steps=2)[:2])
    ]
    bad = [
        {**good[0], "image_uri": str(tmp_path / f"missing-{i}.png"), "edit_id": f"missing-{i}"}
        for i in range(12)
    ]
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.Table.from_pylist(good + bad), manifest)
    out = tmp_path / "out"
    assert main(run_args(manifest, out, flow_model, shard_size=4, run_id="r1")) == 1
    captured = capsys.readouterr()
    text = captured.out
    assert "run r1: 2 succeeded, 12 failed, 0 skipped (of 14)" in text
    # row, edit id, reason
    assert "failed row 2, edit missing-0: image_uri: no such file: /" in text
    assert (
        "failed row 11, edit missing-9:" in text and "missing-10:" not in text
    )  # the first 10 only
    assert "... and 2 more failed row(s)" in text
    assert (
        "all failed rows: status 'failed' and their 'error' in" in text
        and "editflow rerun r1 --out" in text
    )
    # stderr is no terminal here: plain progress lines, the last one complete
    assert "progress: 14/14 edits, 12 failed, 4/4 shards" in captured.err

    assert main(run_args(manifest, out, flow_model, shard_size=4, run_id="r2")) == 1
    assert "run r2: 0 succeeded, 12 failed, 2 skipped (of 14)" in capsys.readouterr().out
    skipped = [
        r for r in pq.read_table(out / "runs" / "r2" / "results" / "skipped.parquet").to_pylist()
    ]
    assert len(skipped) == 2
    for r in skipped:  # a results table always joins back to its images
        assert r["output_uri"] and r["output_uri"].endswith(f"assets/{r['edit_id']}.png")
        assert os.path.exists(r["output_uri"].removeprefix("file://"))
        assert r["metadata_uri"].endswith(f"assets/{r['edit_id']}.json")


def test_progress_off_and_bar_by_environment(
    prefect_server, flow_model, tmp_path, capsys, monkeypatch
):
    image = tmp_path / "scene.png"
    image.write_bytes(scene_png(1))
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.Table.from_pylist(demo_rows([str(image)] * 3, steps=2)[:1]), manifest)
    monkeypatch.setenv("EDITFLOW_PROGRESS", "0")
    assert main(["run", str(manifest), "--out", str(tmp_path / "a"), "--model", flow_model]) == 0
    assert "progress:" not in capsys.readouterr().err
    monkeypatch.setenv("EDITFLOW_PROGRESS", "1")
    assert main(["run", str(manifest), "--out", str(tmp_path / "b"), "--model", flow_model]) == 0
    err = capsys.readouterr().err
    assert (
        "editing:" in err and "1/1" in err and "progress:" not in err
    )  # tqdm's bar, without a terminal


def test_serve_refuses_run_id(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "serve",
                "manifests/examples/demo.parquet",
                "--out",
                str(tmp_path),
                "--cron",
                "0 2 * * *",
                "--run-id",
                "fixed",
            ]
        )
    assert exc.value.code == 2
    assert "--run-id is not accepted" in capsys.readouterr().err


@pytest.mark.parametrize(("verbose", "level"), [(False, "30"), (True, "20")])
def test_dask_info_lines_only_with_verbose(verbose, level):
    """The CLI sets Dask's log level before distributed is imported (and its workers inherit it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASK_")}
    argv = ["-v"] if verbose else []
    code = (
        "import logging, sys\n"
        "from flows import cli\n"
        f"assert cli.main({argv!r} + ['validate', 'manifests/examples/demo.parquet']) == 0\n"
        "import distributed\n"
        "print(logging.getLogger('distributed').getEffectiveLevel())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=os.getcwd(),
    )
    assert out.stdout.strip().splitlines()[-1] == level, out.stderr[-2000:]
