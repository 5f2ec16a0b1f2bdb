"""URIs: splitting, opening stores, reading single objects, endpoint resolution, errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from storage import LocalStore, NotFound, S3Store, is_supported_uri, open_store, read_uri, split_uri
from storage.s3 import get_s3_client, resolve_endpoint


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("s3://bucket/a/b.png", ("s3", "bucket", "a/b.png")),
        ("s3://bucket", ("s3", "bucket", "")),
        ("S3://bucket/x", ("s3", "bucket", "x")),
        ("file:///data/x.png", ("file", "", "/data/x.png")),
        ("file://localhost/data/x.png", ("file", "", "/data/x.png")),
        ("/abs/x.png", ("file", "", "/abs/x.png")),
    ],
)
def test_split_uri(uri: str, expected: tuple[str, str, str]) -> None:
    assert split_uri(uri) == expected


def test_relative_path_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert split_uri("imgs/a.png") == ("file", "", str(tmp_path / "imgs" / "a.png"))
    store = open_store("out")
    assert isinstance(store, LocalStore) and store.root == tmp_path / "out"


@pytest.mark.parametrize(
    ("uri", "match"),
    [
        ("http://example.com/a.png", "unsupported URI scheme 'http://'"),
        ("gs://bucket/a.png", "unsupported URI scheme 'gs://'"),
        ("s3:///key", "no bucket"),
        ("file://host/a.png", "absolute"),
        ("", "expected a URI"),
    ],
)
def test_split_uri_errors(uri: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        split_uri(uri)


@pytest.mark.parametrize(
    ("uri", "ok"),
    [
        ("s3://b/k", True),
        ("s3://b/", False),
        ("S3://b/k", True),
        ("FILE:///x", True),
        ("file:///x", True),
        ("rel/x.png", True),
        ("https://x/y", False),
        ("", False),
    ],
)
def test_is_supported_uri(uri: str, ok: bool) -> None:
    assert is_supported_uri(uri) is ok


def test_open_store_s3(s3_bucket: str, s3_server: str) -> None:
    store = open_store(s3_bucket, s3_endpoint=s3_server)
    assert isinstance(store, S3Store)
    assert store.uri("x") == s3_bucket + "/x"


def test_read_uri_all_schemes(
    tmp_path: Path, s3_bucket: str, s3_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "a.bin").write_bytes(b"local")
    assert read_uri(str(tmp_path / "a.bin")) == b"local"
    assert read_uri(f"file://{tmp_path}/a.bin") == b"local"
    monkeypatch.chdir(tmp_path)
    assert read_uri("a.bin") == b"local"
    open_store(s3_bucket, s3_endpoint=s3_server).put("img/a b+c.png", b"remote")
    assert read_uri(s3_bucket + "/img/a b+c.png", s3_endpoint=s3_server) == b"remote"


def test_read_uri_errors(tmp_path: Path, s3_bucket: str, s3_server: str) -> None:
    with pytest.raises(NotFound, match=str(tmp_path / "nope.png")):
        read_uri(str(tmp_path / "nope.png"))
    with pytest.raises(NotFound, match=f"{s3_bucket}/nope.png"):
        read_uri(s3_bucket + "/nope.png", s3_endpoint=s3_server)
    with pytest.raises(ValueError, match="folder"):
        read_uri(str(tmp_path))
    with pytest.raises(ValueError, match="prefix"):
        read_uri(s3_bucket + "/", s3_endpoint=s3_server)
    with pytest.raises(ValueError, match="unsupported"):
        read_uri("https://example.com/a.png")


def test_endpoint_resolution_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    assert resolve_endpoint() is None
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://generic:1")
    assert resolve_endpoint() == "http://generic:1"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3specific:2")
    assert resolve_endpoint() == "http://s3specific:2"
    assert resolve_endpoint("http://explicit:3") == "http://explicit:3"


def test_endpoint_from_env_var(
    s3_bucket: str, s3_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With only AWS_ENDPOINT_URL_S3 set, open_store/read_uri reach the moto endpoint."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server)
    store = open_store(s3_bucket)
    assert store.client.meta.endpoint_url == s3_server
    store.put("env.txt", b"via env")
    assert read_uri(s3_bucket + "/env.txt") == b"via env"


def test_client_config(s3_server: str) -> None:
    client = get_s3_client(s3_server)
    assert client is get_s3_client(s3_server)  # cached per endpoint
    config = client.meta.config
    # botocore turns max_attempts=5 (retries) into total_max_attempts=6 (first try + retries)
    assert config.retries == {"mode": "standard", "total_max_attempts": 6}
    assert config.request_checksum_calculation == "when_required"
    assert config.response_checksum_validation == "when_required"
    assert config.s3 == {"addressing_style": "path"}


def test_credentials_never_in_repr_or_uri(s3_bucket: str, s3_server: str) -> None:
    store = open_store(s3_bucket, s3_endpoint=s3_server)
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    assert secret not in repr(store) and secret not in store.uri("k")
