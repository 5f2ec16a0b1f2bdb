"""Progress per edit, not per shard: counted per batch inside the shard, fed back from the local runner's
threads (in-process listeners) and from Dask worker processes (Dask events), with edits/s and an ETA."""

from __future__ import annotations

import pytest

from flows import bulk_edit as flows_mod
from flows.runners import make_task_runner
from tasks.options import RunOptions
from tasks.progress import RunProgress, ShardProgress, describe, format_seconds

from .conftest import demo_rows, put, scene_png, write_manifest


def test_run_progress_keeps_the_largest_count_per_shard_and_estimates_the_rest():
    now = [100.0]
    p = RunProgress(10, clock=lambda: now[0])
    assert p.update({"shard": 0, "done": 2})
    now[0] += 4.0
    assert p.update({"shard": 1, "done": 2, "failed": 1})
    assert not p.update({"shard": 0, "done": 1})  # late or repeated events never count twice
    snap = p.snapshot()
    assert (snap["done"], snap["failed"], snap["total"]) == (4, 1, 10)
    assert snap["rate"] == pytest.approx(1.0) and snap["eta"] == pytest.approx(6.0)
    assert describe(snap) == "4/10 edits (1 failed), 1.00 edits/s, ETA 6s"
    assert [format_seconds(s) for s in (5, 65, 7300)] == ["5s", "1m05s", "2h01m"]


def test_shard_progress_is_cumulative_and_capped():
    seen = []
    sp = ShardProgress("r", 3, 5, sink=seen.append)
    sp.set(1)
    sp.add(2)
    sp.add(9)
    assert [e["done"] for e in seen] == [1, 3, 5] and seen[-1] == {
        "run_id": "r",
        "shard": 3,
        "done": 5,
        "failed": 0,
        "edits": 5,
    }


@pytest.fixture
def one_shard(s3_bucket, s3_client):
    images = [f"{s3_bucket}/images/scene-{i}.png" for i in range(3)]
    for i, uri in enumerate(images):
        put(s3_client, uri, scene_png(i))
    manifest = f"{s3_bucket}/manifests/demo.parquet"
    write_manifest(s3_client, manifest, demo_rows(images))  # 9 edits: 6 PnP, 3 P2P
    return manifest, f"{s3_bucket}/out"


def _run_collecting(manifest, out, s3_server, flow_model, runner=None):
    events = []
    flows_mod.set_progress_callback(events.append)
    try:
        fl = (
            flows_mod.bulk_edit
            if runner is None
            else flows_mod.bulk_edit.with_options(task_runner=runner)
        )
        # one shard of 9 edits, batches of 2: the shard finishes only at the end
        options = RunOptions(
            out=out, model=flow_model, s3_endpoint=s3_server, shard_size=9, max_batch=2
        )
        summary = fl(manifest, options, gpu_resources=False)
    finally:
        flows_mod.set_progress_callback(None)
    return summary, events


def _check_moves_per_edit(events):
    finished_at = next(
        i for i, e in enumerate(events) if "edits" in e and "progress" not in e
    )  # the shard's stats
    before = [e["progress"]["done"] for e in events[:finished_at] if "progress" in e]
    assert any(0 < d < 9 for d in before), (
        before
    )  # progress moved while the only shard was still running
    assert before == sorted(before)
    last = [e["progress"] for e in events if "progress" in e][-1]
    assert last["done"] == last["total"] == 9 and last["rate"] > 0 and last["eta"] == 0


def test_progress_moves_per_batch_with_the_local_runner(
    prefect_server, s3_server, flow_model, one_shard
):
    summary, events = _run_collecting(*one_shard, s3_server, flow_model)
    assert summary["counts"]["succeeded"] == 9
    _check_moves_per_edit(events)


def test_progress_comes_back_from_dask_worker_processes(
    prefect_server, s3_server, flow_model, one_shard
):
    runner, _ = make_task_runner("dask", dask_workers=1)
    summary, events = _run_collecting(*one_shard, s3_server, flow_model, runner=runner)
    assert summary["counts"]["succeeded"] == 9
    _check_moves_per_edit(events)
