"""The shard fan-out keeps a bounded window of shard tasks in flight (flows.bulk_edit)."""

from __future__ import annotations

import threading

from prefect.task_runners import ThreadPoolTaskRunner

from flows import bulk_edit as flows_mod
from tasks.options import RunOptions

from .conftest import demo_rows, put, scene_png, write_manifest


def test_fan_out_window_counts_the_workers():
    assert (
        flows_mod.fan_out_window(ThreadPoolTaskRunner(max_workers=3))
        == 3 * flows_mod.IN_FLIGHT_PER_WORKER
    )
    assert flows_mod.fan_out_window(None) == flows_mod.IN_FLIGHT_PER_WORKER


def test_shards_are_submitted_in_a_window_and_all_finish(
    prefect_server, s3_server, s3_client, s3_bucket, flow_model, monkeypatch
):
    images = [f"{s3_bucket}/images/scene-{i}.png" for i in range(3)]
    for i, uri in enumerate(images):
        put(s3_client, uri, scene_png(i))
    manifest = f"{s3_bucket}/manifest.parquet"
    write_manifest(s3_client, manifest, demo_rows(images, steps=2))  # 9 edits

    lock, outstanding, most = threading.Lock(), [0], [0]
    submit = flows_mod._submit_shard

    def counting_submit(*args):
        future = submit(*args)
        with lock:
            outstanding[0] += 1
            most[0] = max(most[0], outstanding[0])

        def done(_):
            with lock:
                outstanding[0] -= 1

        future.add_done_callback(done)
        return future

    monkeypatch.setattr(flows_mod, "_submit_shard", counting_submit)
    options = RunOptions(
        out=f"{s3_bucket}/out", model=flow_model, s3_endpoint=s3_server, shard_size=1
    )
    runner = ThreadPoolTaskRunner(max_workers=1)
    summary = flows_mod.bulk_edit.with_options(task_runner=runner)(manifest, options)
    assert summary["counts"] == {"succeeded": 9, "failed": 0, "skipped": 0}
    assert most[0] == flows_mod.IN_FLIGHT_PER_WORKER  # 9 shards, never more than 2 at once
