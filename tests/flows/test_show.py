"""`editflow show` and URI-style `editflow rerun`, against local and S3 (moto) outputs, tiny model."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from flows.bulk_edit import bulk_edit
from flows.cli import main
from tasks.options import RunOptions

from .conftest import demo_rows, put, run_args, scene_files, scene_png, write_manifest


def test_show_and_rerun_by_uri_on_local_output(prefect_server, flow_model, tmp_path, capsys):
    images = scene_files(tmp_path, 3)
    rows = demo_rows(images)
    missing = tmp_path / "later.png"
    rows[0]["image_uri"] = str(missing)
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.Table.from_pylist(rows), manifest)
    out = tmp_path / "out"
    assert main(run_args(manifest, out, flow_model, shard_size=3, run_id="r1")) == 1
    capsys.readouterr()
    run_uri = f"{out}/runs/r1"

    assert main(["show", run_uri]) == 1  # the run has a failed edit (as `run` exits)
    text = capsys.readouterr().out
    assert "run r1 (finished): 8 succeeded, 1 failed, 0 skipped (of 9)" in text
    assert (
        "failures (1):" in text
        and "row 0  edit " in text
        and f"image_uri: no such file: {missing}" in text
    )
    assert f"report: {out}/runs/r1/report.html" in text
    assert main(["show", "r1", "--out", str(out)]) == 1
    assert capsys.readouterr().out == text

    # interrupted: the plan, no summary, one shard's results missing
    (out / "runs" / "r1" / "summary.json").unlink()
    (out / "runs" / "r1" / "results" / "shard-00002.parquet").unlink()
    assert main(["show", run_uri]) == 1
    text = capsys.readouterr().out
    assert "run r1 (interrupted: 2 of 3 shards have results)" in text
    assert "not run (of 9)" in text and "failures (1):" in text
    assert f"editflow rerun {out}/runs/r1" in text

    missing.write_bytes(scene_png(7))
    assert (
        main(["rerun", run_uri, "--model", flow_model]) == 0
    )  # the run's URI instead of RUN_ID --out
    # the deleted shard's edits were finished (their sidecars exist): skipped, not redone
    assert "run r1: 6 succeeded, 0 failed, 3 skipped (of 9)" in capsys.readouterr().out
    assert main(["show", run_uri + "/"]) == 0
    assert "run r1 (finished): 6 succeeded, 0 failed, 3 skipped" in capsys.readouterr().out


def test_show_and_rerun_by_uri_on_s3(
    prefect_server, s3_server, s3_client, s3_bucket, flow_model, capsys
):
    images = [f"{s3_bucket}/images/scene-{i}.png" for i in range(2)]
    put(s3_client, images[0], scene_png(0))  # images[1] is missing at first
    manifest = f"{s3_bucket}/manifests/m.parquet"
    write_manifest(s3_client, manifest, demo_rows(images)[:7])
    out = f"{s3_bucket}/out"
    first = bulk_edit(
        manifest, RunOptions(out=out, model=flow_model, s3_endpoint=s3_server, shard_size=4)
    )
    assert first["counts"] == {"succeeded": 3, "failed": 4, "skipped": 0}
    run_uri = f"{out}/runs/{first['run_id']}"
    assert main(["show", run_uri, "--s3-endpoint", s3_server]) == 1
    text = capsys.readouterr().out
    assert f"run {first['run_id']} (finished): 3 succeeded, 4 failed" in text
    assert text.count("image_uri: no object at") == 4 and f"report: {run_uri}/report.html" in text
    assert (
        main(["show", first["run_id"], "--out", out, "--s3-endpoint", s3_server, "--limit", "2"])
        == 1
    )
    assert "... 2 more (--limit 0 lists all)" in capsys.readouterr().out

    put(s3_client, images[1], scene_png(1))
    assert main(["rerun", run_uri, "--s3-endpoint", s3_server, "--model", flow_model]) == 0
    assert f"run {first['run_id']}: 7 succeeded, 0 failed" in capsys.readouterr().out


def test_show_of_an_unknown_run_exits_2(tmp_path, capsys):
    assert main(["show", f"{tmp_path}/runs/nope"]) == 2
    assert "no run nope under" in capsys.readouterr().err
