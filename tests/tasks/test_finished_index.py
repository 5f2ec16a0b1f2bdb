"""The finished-edit index: shards record what they finished, planning reads the index instead of listing
``assets/``, an edit whose image was deleted is redone, old roots are listed once, parts are merged."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import pyarrow as pa

from storage import keys, open_store
from storage.base import ObjectStore
from storage.finished import COMPACT_AFTER, load_finished, merge_run_parts, record_finished
from storage.writer import read_json, read_parquet, sha256_hex
from tasks.planning import plan_run
from tasks.units import shard_task

from .conftest import row


class Recording(ObjectStore):
    """A store that forwards to `inner` and records the prefixes listed and the keys checked."""

    def __init__(self, inner: ObjectStore) -> None:
        self.inner, self.listed, self.checked = inner, [], []

    def get(self, key: str) -> bytes:
        return self.inner.get(key)

    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        return self.inner.put(key, data, if_absent=if_absent)

    def exists(self, key: str) -> bool:
        self.checked.append(key)
        return self.inner.exists(key)

    def list(self, prefix: str = "") -> Iterator[str]:
        self.listed.append(prefix)
        return self.inner.list(prefix)

    def delete(self, key: str) -> None:
        self.inner.delete(key)

    def uri(self, key: str = "") -> str:
        return self.inner.uri(key)

    def child(self, prefix: str) -> ObjectStore:
        return self.inner.child(prefix)


def _replan(run, run_id: str) -> dict:
    manifest = run.options.out.rpartition("/out")[0] + "/manifest.parquet"
    return plan_run(manifest, run.options, run_id=run_id)


def _skipped(run, run_id: str) -> list[dict]:
    return read_parquet(run.out, keys.skipped_results_key(run_id)).to_pylist()


def test_deleted_image_is_redone_by_the_next_run(make_run, root):
    run = make_run(root, [row("img:1"), row("img:1", target="a green circle")])
    stats = shard_task.fn(run.options, run.run_id, 0)
    assert (stats["succeeded"], stats["indexed"]) == (2, 2)
    edit_ids = run.shard(0).table.column("edit_id").to_pylist()

    again = _replan(run, "again")
    assert (again["pending"], again["skipped"]) == (0, 2)
    assert all(r["output_uri"] for r in _skipped(run, "again"))

    gone = edit_ids[0]
    image = keys.asset_key(gone, "png")
    run.out.delete(image)  # its sidecar remains: not finished any more
    redo = _replan(run, "redo")
    assert (redo["pending"], redo["skipped"]) == (1, 1)
    assert [r["edit_id"] for r in _skipped(run, "redo")] == [edit_ids[1]]
    stats = shard_task.fn(run.options, "redo", 0)
    assert (stats["succeeded"], stats["skipped"]) == (1, 0)
    sidecar = read_json(run.out, keys.sidecar_key(gone))
    assert sidecar["run_id"] == "redo"
    assert sidecar["output_sha256"] == sha256_hex(run.out.get(image))


def test_planning_reads_the_index_then_checks_images_by_head_or_one_listing(make_run, root):
    run = make_run(root, [row("img:1"), row("img:2"), row("img:2", target="a green circle")])
    shard_task.fn(run.options, run.run_id, 0)
    edit_ids = run.shard(0).table.column("edit_id").to_pylist()
    store = Recording(run.out)
    index = load_finished(store)
    assert store.listed == [keys.finished_index_prefix()]  # not assets/
    assert len(index) == 3 and all(e in index for e in edit_ids) and "other" not in index
    # one edit to check: a HEAD of its image (a listing of assets/ would take one request too)
    assert index.listing_cost == 1
    assert index.verify(edit_ids[:1], index.lookup(edit_ids[:1])).tolist() == [True]
    assert store.checked == [keys.asset_key(edit_ids[0], "png"), keys.sidecar_key(edit_ids[0])]
    assert index.verify(edit_ids[:1], index.lookup(edit_ids[:1])).tolist() == [True]
    assert len(store.checked) == 2  # planning's second pass over the rows sends no second HEAD
    assert store.listed == [keys.finished_index_prefix()]
    # more HEADs than a listing's pages: one listing instead, then no more requests
    run.out.delete(keys.asset_key(edit_ids[2], "png"))
    assert index.verify(edit_ids[1:], index.lookup(edit_ids[1:])).tolist() == [True, False]
    assert store.listed == [keys.finished_index_prefix(), keys.assets_prefix()]
    assert index.verify(edit_ids, index.lookup(edit_ids)).tolist() == [True, True, False]
    assert len(store.checked) == 2 and len(store.listed) == 2


def test_an_old_root_is_listed_once_then_its_listing_is_the_index(local_root):
    store = Recording(open_store(str(local_root)))
    for e in ("a", "b"):
        store.put(keys.asset_key(e, "png"), b"img")
        store.put(keys.sidecar_key(e), b"{}")
    store.put(keys.sidecar_key("c"), b"{}")  # an image deleted before the index existed
    first = load_finished(store)
    assert keys.assets_prefix() in store.listed
    assert ("a" in first, "b" in first, "c" in first) == (True, True, False)
    store.listed.clear()
    second = load_finished(store)
    assert store.listed == [keys.finished_index_prefix()]
    assert second.hashes.tolist() == first.hashes.tolist()


def test_many_parts_are_merged_into_one(root, request):
    endpoint = request.getfixturevalue("s3_server") if root.startswith("s3://") else None
    store = open_store(root, s3_endpoint=endpoint)
    store.put(keys.asset_key("unused", "png"), b"img")  # any asset: the root is not empty
    ids = [f"e{i}" for i in range(COMPACT_AFTER + 6)]
    run_id = f"r-{uuid.uuid4().hex[:6]}"
    for i, e in enumerate(ids):
        status = "failed" if i % 10 == 3 else "succeeded"
        uri = None if status == "failed" else store.uri(keys.asset_key(e, "webp"))
        table = pa.table(
            {"edit_id": [e], "status": [status], "output_uri": pa.array([uri], pa.string())}
        )
        record_finished(store, run_id, i, table)
    parts = list(store.list(keys.finished_index_prefix()))
    assert len(parts) == len(ids)
    index = load_finished(store)
    merged = list(store.list(keys.finished_index_prefix()))
    assert len(merged) == 1 and merged[0].startswith(keys.finished_index_prefix() + "merged-")
    finished = [e for i, e in enumerate(ids) if i % 10 != 3]
    assert len(index) == len(finished) and all(e in index for e in finished)
    assert index.image_key(ids[0], int(index.lookup([ids[0]])[0])) == keys.asset_key(ids[0], "webp")
    assert len(load_finished(store)) == len(finished)  # read back from the merged part


def test_a_sidecar_without_its_image_is_written_again(local_root):
    from storage.writer import write_asset

    store = open_store(str(local_root))
    store.put(keys.sidecar_key("e1"), json.dumps({"old": True}).encode())
    _, _, written = write_asset(store, "e1", b"new image", "png", {"edit_id": "e1"})
    assert written and store.get(keys.asset_key("e1", "png")) == b"new image"
    assert read_json(store, keys.sidecar_key("e1"))["output_sha256"] == sha256_hex(b"new image")
    _, _, again = write_asset(store, "e1", b"other", "png", {"edit_id": "e1"})
    assert not again  # finished now: never rewritten


def test_a_runs_parts_are_merged_into_one_and_other_runs_parts_kept(local_root):
    store = open_store(str(local_root))

    def record(run_id: str, i: int) -> str:
        e = f"{run_id}-e{i}"
        table = pa.table({"edit_id": [e], "status": ["succeeded"], "output_uri": [f"/x/{e}.png"]})
        record_finished(store, run_id, i, table)
        return e

    edits = [record("a", i) for i in range(3)] + [record("a-shard-1", i) for i in range(2)]
    assert merge_run_parts(store, "a") == 3
    left = sorted(k.rpartition("/")[2] for k in store.list(keys.finished_index_prefix()))
    assert len(left) == 3 and left[0].startswith("merged-a-")
    assert left[1:] == ["part-a-shard-1-shard-00000.parquet", "part-a-shard-1-shard-00001.parquet"]
    index = load_finished(store)
    assert len(index) == 5 and all(e in index for e in edits)
    assert merge_run_parts(store, "a") == 0  # nothing left to merge
