"""The `editflow` command line, run in-process against local storage under Prefect's test server."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows.cli import main

from .conftest import demo_rows, run_args, scene_files, scene_png


def test_validate_reports_every_problem_with_row_and_column(capsys, tmp_path):
    rows = [
        {
            "image_uri": "http://example.com/a.png",
            "source_prompt": "a cat",
            "target_prompt": "a dog",
            "method": "pnp",
            "seed": 1,
        },
        {
            "image_uri": "a.png",
            "source_prompt": "",
            "target_prompt": "a dog",
            "method": "magic",
            "seed": 2,
        },
        {
            "image_uri": "a.png",
            "source_prompt": "a cat",
            "target_prompt": None,
            "method": "p2p",
            "seed": 3,
        },
    ]
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert main(["validate", str(path)]) == 2
    out = capsys.readouterr().out
    assert "row 0, column 'image_uri'" in out and "http" in out
    assert "row 1, column 'source_prompt'" in out
    assert "row 1, column 'method'" in out and "magic" in out
    assert "row 2, column 'target_prompt'" in out
    assert "INVALID" in out


def test_validate_the_bundled_examples(capsys):
    assert main(["validate", "manifests/examples/demo.parquet"]) == 0
    assert main(["validate", "manifests/examples/bad.parquet"]) == 2
    assert "problem" in capsys.readouterr().out


def test_run_exit_status_and_summary(prefect_server, flow_model, tmp_path, capsys):
    images = scene_files(tmp_path, 3)
    rows = demo_rows(images)
    rows[0]["image_uri"] = str(tmp_path / "missing.png")  # one row whose source does not exist
    rows[0]["source_prompt"] = "a cat"
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.Table.from_pylist(rows), manifest)
    out = tmp_path / "out"
    code = main(run_args(manifest, out, flow_model, shard_size=3, run_id="r1"))
    text = capsys.readouterr().out
    assert code == 1
    assert "run r1: 8 succeeded, 1 failed, 0 skipped (of 9)" in text
    assert "inversions: 3 computed" in text
    summary = json.loads((out / "runs" / "r1" / "summary.json").read_text())
    assert summary["counts"]["failed"] == 1
    results = pa.concat_tables(
        [pq.read_table(p) for p in sorted((out / "runs" / "r1" / "results").glob("*.parquet"))]
    )
    failed = [r for r in results.to_pylist() if r["status"] == "failed"]
    assert (
        failed[0]["row"] == 0
        and f"image_uri: no such file: {tmp_path}/missing.png" in failed[0]["error"]
    )
    assert len(list((out / "assets").glob("*.png"))) == 8
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:  # the Prefect flow run is named after the run id
        assert "r1" in {run.name for run in client.read_flow_runs()}

    (tmp_path / "missing.png").write_bytes(scene_png(5))
    assert (
        main(["rerun", "r1", "--out", str(out), "--model", flow_model]) == 0
    )  # the model comes from the command line
    assert "run r1: 9 succeeded, 0 failed, 0 skipped (of 9)" in capsys.readouterr().out

    # nothing left to do: said so, before Prefect or the engine are imported, and no run folder made
    from .test_startup import probe_cli

    code, prefect, torch, text = probe_cli(
        run_args(manifest, out, flow_model, shard_size=3, run_id="r2")
    )
    assert (code, prefect, torch) == (0, False, False), text
    assert f"nothing to do: all 9 edits of {manifest} are finished under {out}" in text
    assert f"`editflow validate {manifest} --model {flow_model}` checks every row" in text
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["r1"]
    # a rerun of the complete run: said so, without Prefect or the engine
    code, prefect, torch, text = probe_cli(
        ["rerun", "r1", "--out", str(out), "--model", flow_model]
    )
    assert (code, prefect, torch) == (0, False, False), text
    assert "nothing to do: run r1 is complete (9 succeeded, 0 skipped, 0 failed" in text


def test_run_refuses_an_invalid_manifest_before_loading_a_model(tmp_path, capsys):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"image_uri": ["a.png"], "source_prompt": ["x"]}), path)
    assert (
        main(
            [
                "run",
                str(path),
                "--out",
                str(tmp_path / "out"),
                "--model",
                str(tmp_path / "no-model"),
            ]
        )
        == 2
    )
    out = capsys.readouterr().out
    assert "target_prompt" in out and "nothing was run" in out
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv", [["run"], ["restyle", "c.csv", "--out", "x"], ["bogus"]])
def test_bad_arguments_exit_2(argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
