"""The ObjectStore contract, run against both the local folder store and S3 (moto server)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from botocore.stub import Stubber

from storage import LocalStore, NotFound, ObjectStore, S3Store
from storage.s3 import make_s3_client


def test_put_get_exists_delete(store: ObjectStore) -> None:
    assert not store.exists("a/b.txt")
    assert store.put("a/b.txt", b"hello") is True
    assert store.exists("a/b.txt")
    assert store.get("a/b.txt") == b"hello"
    assert store.put("a/b.txt", b"again") is True  # plain put overwrites
    assert store.get("a/b.txt") == b"again"
    store.delete("a/b.txt")
    assert not store.exists("a/b.txt")
    store.delete("a/b.txt")  # deleting an absent key is not an error


def test_empty_object(store: ObjectStore) -> None:
    store.put("empty", b"")
    assert store.get("empty") == b""


def test_if_absent_keeps_first(store: ObjectStore) -> None:
    assert store.put("k.bin", b"first", if_absent=True) is True
    assert store.put("k.bin", b"second", if_absent=True) is False
    assert store.get("k.bin") == b"first"


def test_not_found_names_uri(store: ObjectStore) -> None:
    with pytest.raises(NotFound) as info:
        store.get("missing/thing.png")
    assert isinstance(info.value, KeyError)
    assert store.uri("missing/thing.png") in str(info.value)
    assert str(info.value) == f"no object at {store.uri('missing/thing.png')}"


def test_list_is_recursive_sorted_and_string_prefixed(store: ObjectStore) -> None:
    for key in ["runs/ab/x", "runs/abc/y", "runs/b/z", "assets/1.png", "top"]:
        store.put(key, b"1")
    assert list(store.list()) == ["assets/1.png", "runs/ab/x", "runs/abc/y", "runs/b/z", "top"]
    assert list(store.list("runs/")) == ["runs/ab/x", "runs/abc/y", "runs/b/z"]
    assert list(store.list("runs/ab")) == ["runs/ab/x", "runs/abc/y"]
    assert list(store.list("runs/ab/")) == ["runs/ab/x"]
    assert list(store.list("nothing/")) == []


def test_child_store(store: ObjectStore) -> None:
    child = store.child("runs/r1/")
    child.put("plan.json", b"{}")
    assert store.get("runs/r1/plan.json") == b"{}"
    assert list(child.list()) == ["plan.json"]
    assert child.uri("plan.json") == store.uri("runs/r1/plan.json")
    assert list(child.child("nested").list()) == []


@pytest.mark.parametrize("bad", ["/abs", "a/../b", "a//b", "..", "a\\b", "x\x00", ""])
def test_bad_keys_rejected(store: ObjectStore, bad: str) -> None:
    with pytest.raises(ValueError):
        store.put(bad, b"x")


def test_uri_forms(local_root, s3_bucket: str, s3_server: str) -> None:
    local = LocalStore(local_root)
    assert local.uri("a/b.png") == str(local_root / "a" / "b.png")
    bucket = s3_bucket.split("/")[2]
    s3 = S3Store(bucket, "out/", endpoint=s3_server)
    assert s3.uri("a/b.png") == f"s3://{bucket}/out/a/b.png"
    assert s3.uri() == f"s3://{bucket}/out/"
    assert repr(s3) == f"S3Store('s3://{bucket}/out/')"


def test_local_racing_writers_one_winner(local_root) -> None:
    """Two threads put the same key with if_absent: exactly one wins, its bytes stay."""
    store = LocalStore(local_root)
    for i in range(30):
        key = f"race/{i}.bin"
        barrier = threading.Barrier(2)

        def write(payload: bytes, key: str = key, barrier: threading.Barrier = barrier) -> bool:
            barrier.wait()
            return store.put(key, payload, if_absent=True)

        with ThreadPoolExecutor(2) as pool:
            a, b = pool.map(write, [b"A" * 100_000, b"B" * 100_000])
        assert sorted([a, b]) == [False, True]
        assert store.get(key) == (b"A" if a else b"B") * 100_000
    assert not [
        p for p in (local_root / "race").iterdir() if p.name.startswith(".")
    ]  # no temp files left


def test_local_never_lists_temp_files(local_root) -> None:
    store = LocalStore(local_root)
    store.put("a/x", b"1")
    (local_root / "a" / ".x.tmp-0123456789abcdef0123456789abcdef").write_bytes(b"partial")
    assert list(store.list()) == ["a/x"]


def test_s3_pagination(s3_bucket: str, s3_server: str) -> None:
    """Listing follows continuation tokens: 25 keys in pages of 10 take 3 requests.

    (A small ``page_size`` exercises the same code path as >1,000 keys with S3's 1,000 cap,
    without 1,000 uploads.)
    """
    bucket = s3_bucket.split("/")[2]
    client = make_s3_client(s3_server)
    requests: list[dict] = []
    client.meta.events.register(
        "before-call.s3.ListObjectsV2", lambda params, **_: requests.append(params)
    )
    store = S3Store(bucket, "many", client, page_size=10)
    keys = [f"k/{i:05d}" for i in range(25)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda k: store.put(k, b""), keys))
    store.put("other", b"")
    assert list(store.list("k/")) == keys
    assert [r["query_string"]["max-keys"] for r in requests] == [10, 10, 10]
    assert list(S3Store(bucket, "many", client).list("k/")) == keys  # default page size 1000


def test_s3_page_size_bounds() -> None:
    with pytest.raises(ValueError, match="page_size"):
        S3Store("bucket", "p", client=object(), page_size=1001)


def test_s3_folder_markers_are_not_listed(s3_bucket: str, s3_server: str, s3_client) -> None:
    bucket = s3_bucket.split("/")[2]
    s3_client.put_object(Bucket=bucket, Key="p/dir/", Body=b"")
    store = S3Store(bucket, "p", endpoint=s3_server)
    store.put("dir/a", b"1")
    assert list(store.list()) == ["dir/a"]


def test_s3_content_type(s3_bucket: str, s3_server: str, s3_client) -> None:
    bucket = s3_bucket.split("/")[2]
    store = S3Store(bucket, "p", endpoint=s3_server)
    store.put("a.png", b"\x89PNG")
    assert s3_client.head_object(Bucket=bucket, Key="p/a.png")["ContentType"] == "image/png"


def test_s3_presigned_url(s3_bucket: str, s3_server: str) -> None:
    bucket = s3_bucket.split("/")[2]
    url = S3Store(bucket, "p", endpoint=s3_server).presigned_url("a.png", expires_s=60)
    assert url.startswith(f"{s3_server}/{bucket}/p/a.png?")


def test_s3_conditional_conflict_is_retried(s3_server: str) -> None:
    """AWS answers 409 to a conditional write racing another: retried, then the 412 means 'exists'.

    moto never returns 409, so this one test stubs the two responses with botocore's Stubber.
    """
    store = S3Store("bucket", "p", make_s3_client(s3_server))
    with Stubber(store.client) as stub:
        stub.add_client_error("put_object", "ConditionalRequestConflict", http_status_code=409)
        stub.add_client_error("put_object", "PreconditionFailed", http_status_code=412)
        assert store.put("k", b"x", if_absent=True) is False
        stub.add_client_error("put_object", "ConditionalRequestConflict", http_status_code=409)
        stub.add_response("put_object", {})
        assert store.put("k", b"x", if_absent=True) is True
        stub.assert_no_pending_responses()


def test_s3_other_errors_propagate(s3_server: str) -> None:
    from botocore.exceptions import ClientError

    store = S3Store("no-such-bucket-here", "p", endpoint=s3_server)
    with pytest.raises(ClientError):
        store.put("k", b"x")
