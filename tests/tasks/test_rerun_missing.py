"""A rerun redoes the edits whose output was deleted after their shard succeeded (an image, or its
sidecar), and only those: every other finished edit is kept, not rewritten."""

from __future__ import annotations

from storage import keys
from storage.finished import record_shard
from storage.writer import read_parquet
from tasks.runs import shards_to_rerun
from tasks.shard import run_shard

from .conftest import row


def _results(run, shard: int) -> dict[str, dict]:
    table = read_parquet(run.out, keys.shard_results_key(run.run_id, shard))
    return {r["edit_id"]: r for r in table.to_pylist()}


def _run_shards(run, shards) -> None:
    for s in shards:  # as the flow's shard task does: edit, then record what it finished
        run_shard(run.options, run.run_id, s)
        record_shard(run.out, run.run_id, s)


def test_a_rerun_redoes_deleted_outputs_of_succeeded_shards_and_keeps_the_rest(
    model, make_run, root
) -> None:
    rows = [row("img:1"), row("img:1", target="a green circle"), row("img:2")]
    run = make_run(root, rows, shard_size=2)  # shard 0: the two edits of img:1; shard 1: img:2
    _run_shards(run, [0, 1])
    assert shards_to_rerun(run.options, run.run_id, run.plan) == {}
    first = {**_results(run, 0), **_results(run, 1)}
    assert {r["status"] for r in first.values()} == {"succeeded"}
    image_gone, kept, sidecar_gone = (
        next(e for e, r in first.items() if r["row"] == i) for i in (1, 0, 2)
    )
    image_key = keys.asset_key(image_gone, "png")
    kept_files = {k: run.out.get(k) for k in (keys.asset_key(kept, "png"), keys.sidecar_key(kept))}
    kept_image = run.out.get(keys.asset_key(sidecar_gone, "png"))
    # the image of one edit of shard 0 and the sidecar of shard 1's edit are deleted
    run.out.delete(image_key)
    run.out.delete(keys.sidecar_key(sidecar_gone))

    assert shards_to_rerun(run.options, run.run_id, run.plan) == {0: 1, 1: 1}  # one edit each
    marked = {**_results(run, 0), **_results(run, 1)}
    for e in (image_gone, sidecar_gone):
        assert marked[e]["status"] == "failed" and marked[e]["output_uri"] is None
        assert "is gone; redone by a rerun" in marked[e]["error"]
    assert marked[kept] == first[kept]

    _run_shards(run, [0, 1])
    again = {**_results(run, 0), **_results(run, 1)}
    assert {e: r["status"] for e, r in again.items()} == dict.fromkeys(first, "succeeded")
    assert again[kept] == first[kept]  # kept from the first attempt, not redone
    assert run.out.exists(image_key) and run.out.exists(keys.sidecar_key(sidecar_gone))
    # nothing finished was written again (a rewritten sidecar would hold other timings)
    assert {k: run.out.get(k) for k in kept_files} == kept_files
    assert run.out.get(keys.asset_key(sidecar_gone, "png")) == kept_image
    assert shards_to_rerun(run.options, run.run_id, run.plan) == {}
