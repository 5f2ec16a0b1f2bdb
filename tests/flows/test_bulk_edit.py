"""The bulk-edit flows run for real (Prefect test server) against a real S3 endpoint (moto), tiny model."""

from __future__ import annotations

import io
import json
import uuid

import pyarrow.parquet as pq
import pytest
from PIL import Image
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowFilter, FlowFilterName

from flows.bulk_edit import bulk_edit, rerun, restyle
from flows.runners import make_task_runner
from tasks.options import RestyleSpec, RunOptions

from .conftest import demo_rows, get, keys_under, put, scene_png, write_manifest


def _results(s3_client, out: str, run_id: str):
    keys = [
        k for k in keys_under(s3_client, f"{out}/runs/{run_id}/results/") if k.endswith(".parquet")
    ]
    bucket = out[len("s3://") :].split("/", 1)[0]
    tables = [pq.read_table(io.BytesIO(get(s3_client, f"s3://{bucket}/{k}"))) for k in keys]
    rows = [r for t in tables for r in t.to_pylist()]
    return {r["edit_id"]: r for r in rows}


def _catalog(bucket: str, s3_client) -> dict:
    images = [f"{bucket}/images/scene-{i}.png" for i in range(3)]
    for i, uri in enumerate(images):
        put(s3_client, uri, scene_png(i))
    manifest = f"{bucket}/manifests/demo.parquet"
    write_manifest(s3_client, manifest, demo_rows(images))
    return {"bucket": bucket, "images": images, "manifest": manifest, "out": f"{bucket}/out"}


@pytest.fixture
def catalog(s3_bucket, s3_client):
    return _catalog(s3_bucket, s3_client)


def _run(catalog, s3_server, flow_model, **kw):
    options = RunOptions(
        out=catalog["out"], model=flow_model, s3_endpoint=s3_server, shard_size=4, **kw
    )
    return bulk_edit(catalog["manifest"], options)


@pytest.fixture(scope="module")
def first_run(prefect_server, s3_server, s3_client, flow_model):
    """The demo catalog in a bucket of its own, edited once by the local runner: (catalog, summary).
    Shared by the tests that only read that run's outputs or add runs of the same manifest."""
    bucket = f"s3://test-{uuid.uuid4().hex[:16]}"
    s3_client.create_bucket(Bucket=bucket.removeprefix("s3://"))
    catalog = _catalog(f"{bucket}/prefix", s3_client)
    return catalog, _run(catalog, s3_server, flow_model)


def test_end_to_end_then_nothing_redone(s3_server, s3_client, flow_model, first_run):
    catalog, summary = first_run
    assert summary["counts"] == {"succeeded": 9, "failed": 0, "skipped": 0}
    assert summary["inversions_computed"] == 3  # one per source image, though 9 edits over 3 shards
    results = _results(s3_client, catalog["out"], summary["run_id"])
    assert len(results) == 9
    skus = set()
    for edit_id, r in results.items():
        assert r["status"] == "succeeded" and r["error"] is None
        image_bytes = get(s3_client, r["output_uri"])
        side = json.loads(get(s3_client, r["metadata_uri"]))
        assert side["edit_id"] == edit_id and side["output_uri"] == r["output_uri"]
        assert side["passthrough"]["sku"] == r["sku"]
        skus.add(r["sku"])
        assert side["model_revision"].startswith("local-") and side["versions"]["diffusers"]
        assert side["unet_evals"] == pytest.approx(r["unet_evals"]) and r["unet_evals"] > 0
        assert side["source_uri"] in catalog["images"] and len(side["source_sha256"]) == 64
        import hashlib

        assert side["output_sha256"] == hashlib.sha256(image_bytes).hexdigest()
        png = Image.open(io.BytesIO(image_bytes))
        assert json.loads(png.text["editflow"])["target_prompt"] == side["target_prompt"]
    assert len(skus) == 9
    objects = keys_under(s3_client, catalog["out"])
    assert sum(k.endswith(".safetensors") for k in objects) == 3  # three cached inversions
    plan = json.loads(get(s3_client, f"{catalog['out']}/runs/{summary['run_id']}/plan.json"))
    assert plan["sources"] == 3 and sum(s["edits"] for s in plan["shards"]) == 9

    # the same manifest again: nothing redone, nothing recomputed, nothing rewritten
    again = _run(catalog, s3_server, flow_model)
    assert again["counts"] == {"succeeded": 0, "failed": 0, "skipped": 9}
    assert again["inversions_computed"] == 0 and again["unet_evals"] == 0
    after = keys_under(s3_client, catalog["out"])
    assert {k: v for k, v in after.items() if "/runs/" not in k} == {
        k: v for k, v in objects.items() if "/runs/" not in k
    }


def test_missing_source_fails_its_rows_then_rerun_finishes_only_those(
    prefect_server, s3_server, s3_client, flow_model, catalog
):
    missing = catalog["images"][1]
    bucket, key = missing[len("s3://") :].split("/", 1)
    s3_client.delete_object(Bucket=bucket, Key=key)
    first = _run(catalog, s3_server, flow_model)
    assert first["counts"] == {"succeeded": 5, "failed": 4, "skipped": 0}
    results = _results(s3_client, catalog["out"], first["run_id"])
    failed = {e for e, r in results.items() if r["status"] == "failed"}
    for e in failed:
        assert results[e]["image_uri"] == missing
        assert f"row {results[e]['row']}: image_uri: no object at {missing}" == results[e]["error"]
    before = keys_under(s3_client, catalog["out"])

    put(s3_client, missing, scene_png(1))
    again = rerun(
        first["run_id"], RunOptions(out=catalog["out"], s3_endpoint=s3_server, model=flow_model)
    )
    assert again["counts"] == {"succeeded": 9, "failed": 0, "skipped": 0}
    assert again["attempts"][-1]["inversions_computed"] == 1  # this attempt's; the run's total is 3
    assert again["inversions_computed"] == first["inversions_computed"] + 1
    after = keys_under(s3_client, catalog["out"])
    changed = {k for k in before if "/runs/" not in k and after.get(k) != before[k]}
    assert not changed  # nothing finished was touched
    new_assets = {
        k.rsplit("/", 1)[1].split(".")[0] for k in set(after) - set(before) if "/assets/" in k
    }
    assert new_assets == failed  # exactly the failed rows were edited


def test_changed_source_under_same_uri_gets_a_new_inversion(
    prefect_server, s3_server, s3_client, flow_model, catalog
):
    first = _run(catalog, s3_server, flow_model)
    assert first["inversions_computed"] == 3
    uri = catalog["images"][0]
    put(s3_client, uri, scene_png(42))  # a different picture under the same URI
    write_manifest(s3_client, catalog["manifest"], demo_rows(catalog["images"])
                   + [{"image_uri": uri, "source_prompt": "a red circle on a gray background",
                       "target_prompt": "a green circle on a gray background", "method": "pnp", "num_steps": 4, "sku": "new"}])  # fmt: skip
    second = _run(catalog, s3_server, flow_model)
    assert second["counts"] == {"succeeded": 1, "failed": 0, "skipped": 9}
    assert second["inversions_computed"] == 1 and second["inversion_cache_hits"] == 0
    new = [
        r
        for r in _results(s3_client, catalog["out"], second["run_id"]).values()
        if r["status"] == "succeeded"
    ]
    side = json.loads(get(s3_client, new[0]["metadata_uri"]))
    assert side["inversion_cache_hit"] is False
    import hashlib

    assert side["source_sha256"] == hashlib.sha256(scene_png(42)).hexdigest()


def test_restyle_catalog_times_styles(
    prefect_server, s3_server, s3_client, flow_model, catalog, tmp_path
):
    csv = tmp_path / "catalog.csv"
    lines = ["image_uri,caption,sku"] + [
        f"{u},a shape on a background,S{i}" for i, u in enumerate(catalog["images"])
    ]
    csv.write_text("\n".join(lines) + "\n")
    spec = RestyleSpec(styles=["in watercolor style", "red"], template="{caption} {style}")
    options = RunOptions(out=catalog["out"], model=flow_model, s3_endpoint=s3_server, shard_size=4)
    summary = restyle(str(csv), spec, options)
    assert summary["counts"] == {"succeeded": 6, "failed": 0, "skipped": 0}
    assert summary["inversions_computed"] == 3
    results = _results(s3_client, catalog["out"], summary["run_id"])
    assert sorted(r["style"] for r in results.values()) == ["in watercolor style"] * 3 + ["red"] * 3
    with get_client(sync_client=True) as client:  # bulk edit ran as a subflow of restyle
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["bulk-edit"]))
        )
        [child] = [r for r in runs if r.parameters.get("run_id") == summary["run_id"]]
        assert child.parent_task_run_id is not None  # a subflow run, not the flow's body called
        parent = client.read_flow_run(client.read_task_run(child.parent_task_run_id).flow_run_id)
        assert client.read_flow(parent.flow_id).name == "restyle"
    assert child.parameters["options"]["out"] == options.out  # stored as JSON


def test_dask_cluster_gives_the_same_results(s3_server, s3_client, flow_model, first_run):
    catalog, local = first_run
    runner, gpu = make_task_runner("dask", dask_workers=2)
    out2 = catalog["bucket"] + "/dask-out"  # not under catalog["out"]: that run's keys stay its own
    options = RunOptions(out=out2, model=flow_model, s3_endpoint=s3_server, shard_size=4)
    dask_summary = bulk_edit.with_options(task_runner=runner)(
        catalog["manifest"], options, gpu_resources=gpu
    )
    assert dask_summary["counts"] == local["counts"] == {"succeeded": 9, "failed": 0, "skipped": 0}
    a = _results(s3_client, catalog["out"], local["run_id"])
    b = _results(s3_client, out2, dask_summary["run_id"])
    assert a.keys() == b.keys()
    for e in a:
        ia = Image.open(io.BytesIO(get(s3_client, a[e]["output_uri"])))
        ib = Image.open(io.BytesIO(get(s3_client, b[e]["output_uri"])))
        diff = max(
            abs(x - y) for pa_, pb in zip(ia.getdata(), ib.getdata()) for x, y in zip(pa_, pb)
        )
        assert diff <= 1, e  # same edit; thread counts may differ by one rounding step
        assert a[e]["unet_evals"] == b[e]["unet_evals"]
