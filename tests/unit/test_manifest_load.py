"""Loading manifests through the storage ObjectStore interface: a local file or folder and an S3
object or prefix follow one code path (exists, list, get), with the same names, order and messages."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import manifests.load as load
from manifests import ManifestError, load_manifest, manifest_files
from storage import ObjectStore, open_store

PART = pa.table({"image_uri": ["a.png"], "source_prompt": ["a cat"], "target_prompt": ["a dog"]})
LAYOUT = {  # relative key -> rows (None = not a manifest file, or not picked up)
    "b.parquet": 2,
    "a/z.parquet": 1,
    "a/b/c.parquet": 3,
    "_SUCCESS": None,
    "notes.txt": None,
    ".hidden.parquet": None,
    "_tmp/x.parquet": None,
    "a/.cache/y.parquet": None,
}
ORDER = ["a/b/c.parquet", "a/z.parquet", "b.parquet"]  # name order of the relative keys


def _bytes(rows: int) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.concat_tables([PART] * rows), sink)
    return sink.getvalue().to_pybytes()


def _fill(store: ObjectStore) -> None:
    for key, rows in LAYOUT.items():
        store.put(key, _bytes(rows) if rows else b"not parquet")


class Recording(ObjectStore):
    """A store that records which interface methods the loader calls."""

    calls: list[tuple[str, str]] = []

    def __init__(self, inner: ObjectStore) -> None:
        self.inner = inner

    def get(self, key: str) -> bytes:
        self.calls.append(("get", key))
        return self.inner.get(key)

    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        raise AssertionError("loading a manifest writes nothing")

    def exists(self, key: str) -> bool:
        self.calls.append(("exists", key))
        return self.inner.exists(key)

    def list(self, prefix: str = ""):
        self.calls.append(("list", prefix))
        return self.inner.list(prefix)

    def delete(self, key: str) -> None:
        raise AssertionError("loading a manifest deletes nothing")

    def uri(self, key: str = "") -> str:
        return self.inner.uri(key)

    def child(self, prefix: str) -> ObjectStore:
        return Recording(self.inner.child(prefix))


@pytest.fixture
def recording(monkeypatch):
    Recording.calls = []

    def opened(uri: str, *, s3_endpoint: str | None = None, **kw) -> ObjectStore:
        return Recording(open_store(uri, s3_endpoint=s3_endpoint, **kw))

    monkeypatch.setattr(load, "open_store", opened)

    def no_path_reading(source, *args, **kwargs):
        assert isinstance(source, pa.BufferReader), f"read {source!r} around the store"
        return real(source, *args, **kwargs)

    real = pq.ParquetFile
    monkeypatch.setattr(pq, "ParquetFile", no_path_reading)
    return Recording.calls


def test_local_folder_and_s3_prefix_load_alike(tmp_path: Path, s3_bucket, s3_server, recording):
    _fill(open_store(str(tmp_path / "m")))
    _fill(open_store(f"{s3_bucket}/runs/m", s3_endpoint=s3_server))
    local = load_manifest(str(tmp_path / "m"))
    assert [k for op, k in recording if op == "get"] == ORDER
    assert ("list", "") in recording
    recording.clear()
    remote = load_manifest(f"{s3_bucket}/runs/m", s3_endpoint=s3_server)
    assert [k for op, k in recording if op == "get"] == ORDER
    assert remote.equals(local) and local.num_rows == 6
    assert manifest_files(local) == [(str(tmp_path / "m" / k), LAYOUT[k]) for k in ORDER]
    assert manifest_files(remote) == [(f"{s3_bucket}/runs/m/{k}", LAYOUT[k]) for k in ORDER]


def test_single_file_and_object(tmp_path: Path, s3_bucket, s3_server, recording):
    _fill(open_store(str(tmp_path)))
    _fill(open_store(s3_bucket, s3_endpoint=s3_server))
    local = load_manifest(str(tmp_path / "a" / "b" / "c.parquet"))
    assert recording == [("exists", "c.parquet"), ("get", "c.parquet")]
    recording.clear()
    remote = load_manifest(f"{s3_bucket}/a/b/c.parquet", s3_endpoint=s3_server)
    key = "prefix/a/b/c.parquet"  # s3_bucket is s3://{bucket}/prefix; the bucket's root store
    assert recording == [("exists", key), ("get", key)]
    assert local.num_rows == remote.num_rows == 3
    assert manifest_files(remote) == [(f"{s3_bucket}/a/b/c.parquet", 3)]
    # a single file is read whatever its name
    with pytest.raises(ManifestError, match="notes.txt: cannot read as Parquet"):
        load_manifest(f"{s3_bucket}/notes.txt", s3_endpoint=s3_server)
    # the whole bucket is a prefix too
    bucket = s3_bucket.rsplit("/", 1)[0]
    assert load_manifest(bucket, s3_endpoint=s3_server).num_rows == 6


def test_messages(tmp_path: Path, s3_bucket, s3_server):
    with pytest.raises(ManifestError, match="^1 problem.*\n  no manifest file or folder at /"):
        load_manifest(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManifestError, match=f"no Parquet files at {tmp_path / 'empty'}$"):
        load_manifest(str(tmp_path / "empty"))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.csv").write_text("a,b")
    with pytest.raises(ManifestError, match="no Parquet files at"):
        load_manifest(str(tmp_path / "other"))
    uri = f"{s3_bucket}/nothing/"
    with pytest.raises(ManifestError, match=f"no Parquet files at {uri}$"):
        load_manifest(uri, s3_endpoint=s3_server)
    store = open_store(f"{s3_bucket}/bad", s3_endpoint=s3_server)
    store.put("a.parquet", _bytes(1))
    store.put("b.parquet", b"garbage")
    with pytest.raises(ManifestError) as info:
        load_manifest(f"{s3_bucket}/bad", s3_endpoint=s3_server)
    [problem] = info.value.problems
    assert problem.reason.startswith(f"{s3_bucket}/bad/b.parquet: cannot read as Parquet: ")


def test_a_broken_link_in_a_folder_is_skipped(tmp_path: Path):
    """As before the move to the store interface: only files are manifest parts."""
    folder = tmp_path / "m"
    _fill(open_store(str(folder)))
    os.symlink(tmp_path / "gone.parquet", folder / "gone.parquet")
    assert load_manifest(str(folder)).num_rows == 6


class _RemovedAfterListing(Recording):
    """A store whose `victim` object is deleted by someone else right after the listing."""

    victim = ""

    def list(self, prefix: str = ""):
        keys = list(self.inner.list(prefix))
        self.inner.delete(self.victim)
        return iter(keys)


def test_an_object_removed_while_loading_is_a_problem_not_a_silent_skip(
    s3_bucket, s3_server, monkeypatch
):
    """Skipping it would run the manifest without that file's rows."""
    store = open_store(f"{s3_bucket}/race", s3_endpoint=s3_server)
    store.put("a.parquet", _bytes(1))
    store.put("b.parquet", _bytes(2))
    _RemovedAfterListing.victim = "b.parquet"
    monkeypatch.setattr(
        load,
        "open_store",
        lambda uri, *, s3_endpoint=None, **kw: _RemovedAfterListing(
            open_store(uri, s3_endpoint=s3_endpoint, **kw)
        ),
    )
    with pytest.raises(ManifestError) as info:
        load_manifest(f"{s3_bucket}/race", s3_endpoint=s3_server)
    [problem] = info.value.problems
    assert problem.reason == (
        f"{s3_bucket}/race/b.parquet: listed but gone when read (was it removed while loading?)"
    )
