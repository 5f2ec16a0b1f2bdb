"""Flows only wire tasks: the plan task is a run's one manifest check (an invalid manifest leaves nothing,
claims no run id), the flows' reads and writes retry transient storage errors, the run options travel
as one object (deployments' JSON parameters included)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from flows import bulk_edit as flows_mod
from flows.cli import main
from storage.s3 import MAX_ATTEMPTS, clear_client_cache
from tasks.options import RestyleSpec, RunOptions
from tests.reliability.faultproxy import FaultProxy

from .conftest import demo_rows, put, scene_png, write_manifest

REPO = Path(__file__).resolve().parents[2]
CATALOG = "manifests/examples/catalog.csv"


def _invalid_manifest(tmp_path: Path) -> str:
    path = tmp_path / "bad.parquet"
    rows = [{"image_uri": "a.png", "source_prompt": "a cat", "method": "magic"}]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*"))


def test_an_invalid_manifest_is_refused_by_the_plan_and_leaves_nothing(
    prefect_server, flow_model, tmp_path, capsys
):
    manifest = _invalid_manifest(tmp_path)
    fresh = tmp_path / "new" / "out"  # the write probe makes it; refused, it is removed again
    argv = ["run", manifest, "--model", flow_model, "--run-id", "r1"]
    assert main([*argv, "--out", str(fresh)]) == 2
    text = capsys.readouterr().out
    assert "row 0, column 'method'" in text and "column 'target_prompt'" in text
    assert text.rstrip().endswith(f"{manifest}: INVALID (2 problem(s)); nothing was run")
    assert not (tmp_path / "new").exists()

    existing = tmp_path / "out"
    (existing / "keep").mkdir(parents=True)
    assert main([*argv, "--out", str(existing)]) == 2
    assert _files(existing) == [existing / "keep"]  # no run folder, the run id not claimed
    capsys.readouterr()
    images = []
    for i in range(3):
        images.append(str(tmp_path / f"scene-{i}.png"))
        Path(images[-1]).write_bytes(scene_png(i))
    good = tmp_path / "good.parquet"
    pq.write_table(pa.Table.from_pylist(demo_rows(images)[:2]), good)
    assert main(["run", str(good), *argv[2:], "--out", str(existing)]) == 0
    assert "run r1: 2 succeeded" in capsys.readouterr().out


def test_an_invalid_manifest_with_a_dask_runner(prefect_server, flow_model, tmp_path, capsys):
    manifest = _invalid_manifest(tmp_path)
    out = tmp_path / "out"
    argv = ["run", manifest, "--out", str(out), "--model", flow_model, "--runner", "dask"]
    assert main([*argv, "--dask-workers", "1"]) == 2
    assert "INVALID (2 problem(s)); nothing was run" in capsys.readouterr().out
    assert not out.exists()


def test_an_invalid_restyle_manifest_names_catalog_rows_and_styles(
    prefect_server, flow_model, tmp_path, capsys
):
    out = tmp_path / "out"
    out.mkdir()
    argv = ["restyle", CATALOG, "--style", "striped", "--style", "dotted", "--out", str(out)]
    argv += ["--model", flow_model, "--settings", '{"bogus": 1}', "--run-id", "rs"]
    assert main(argv) == 2
    text = capsys.readouterr().out
    assert "row 3, column 'settings'" in text and "(catalog row 1, style 'dotted')" in text
    assert "(catalog row 2, style 'striped')" in text
    assert text.rstrip().endswith(
        f"{CATALOG}: the restyle manifest is INVALID (6 problem(s)); nothing was run"
    )
    assert _files(out) == []  # its manifest and run folder removed again


def test_the_flows_reads_and_writes_retry_transient_errors(
    prefect_server, s3_server, s3_client, s3_bucket, flow_model
):
    images = [f"{s3_bucket}/images/scene-{i}.png" for i in range(2)]
    for i, uri in enumerate(images):
        put(s3_client, uri, scene_png(i))
    manifest = f"{s3_bucket}/manifests/m.parquet"
    write_manifest(s3_client, manifest, demo_rows(images)[:3])
    # every attempt boto3 makes fails, once for each: only the task's own retry gets through
    faults = {("PUT", "summary.json"): MAX_ATTEMPTS, ("GET", "results%2F"): MAX_ATTEMPTS}
    proxy = FaultProxy(s3_server, targeted=faults)
    try:
        clear_client_cache()
        options = RunOptions(out=f"{s3_bucket}/out", model=flow_model, s3_endpoint=proxy.url)
        summary = flows_mod.bulk_edit(manifest, options, run_id="flaky")
    finally:
        proxy.close()
        clear_client_cache()
    assert proxy.targeted_failed == faults, proxy.targeted_failed  # the faults happened
    assert "summary_error" not in summary
    assert summary["counts"] == {"succeeded": 3, "failed": 0, "skipped": 0}
    bucket, prefix = s3_bucket[len("s3://") :].split("/", 1)
    s3_client.head_object(Bucket=bucket, Key=f"{prefix}/out/runs/flaky/summary.json")


def test_run_options_travel_as_one_object_and_as_json():
    options = RunOptions(out="s3://b/out", shard_size=3, max_batch=2, threads=1)
    params = flows_mod.bulk_edit.validate_parameters({"manifest": "m", "options": options})
    assert params["options"] is options
    params = flows_mod.bulk_edit.validate_parameters(
        {"manifest": "m", "options": options.to_dict()}
    )
    assert params["options"] == options  # a deployment's JSON parameters, coerced back
    with pytest.raises(Exception, match="image_format must be one of"):
        flows_mod.bulk_edit.validate_parameters(
            {"manifest": "m", "options": {"out": "x", "image_format": "bmp"}}
        )
    spec = {"styles": ["a", "b"], "template": "{caption} {style}"}
    params = flows_mod.restyle.validate_parameters(
        {"catalog": "c", "spec": spec, "options": options}
    )
    assert params["spec"] == RestyleSpec(styles=("a", "b"), template="{caption} {style}")


def test_the_deployments_parameters_fit_their_flows():
    config = yaml.safe_load((REPO / "infra" / "prefect.yaml").read_text())
    flows = {
        "flows/bulk_edit.py:bulk_edit": flows_mod.bulk_edit,
        "flows/bulk_edit.py:rerun": flows_mod.rerun,
        "flows/bulk_edit.py:bulk_edit_on_dask": flows_mod.bulk_edit_on_dask,
    }
    run_time = {"flows/bulk_edit.py:rerun": {"run_id": "r"}}  # given with each run of on-demand
    for dep in config["deployments"]:
        fl = flows[dep["entrypoint"]]
        params = fl.validate_parameters(
            {**dep["parameters"], **run_time.get(dep["entrypoint"], {})}
        )
        assert isinstance(params["options"], RunOptions), dep["name"]
