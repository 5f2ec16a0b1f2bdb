"""Hostile storage inputs at the unit level: links below a local store's root, sources that are not
regular files, the per-source byte cap (local and S3), percent-encoded file URIs, the cache HMAC."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from storage import LocalStore, NotFound, open_store, read_uri
from storage.base import NotRegularFile, TooLarge, UnsafePath
from storage.cache import (
    CACHE_KEY_ENV,
    BlobCache,
    CorruptEntry,
    UntrustedEntry,
    seal,
    unseal,
)


def _outside(tmp_path: Path) -> Path:
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "x.json").write_text('{"planted": true}')
    return target


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# ---- links below the root
@pytest.mark.parametrize("where", ["assets", "runs/r1"])
def test_a_linked_folder_below_the_root_is_never_followed(tmp_path: Path, where: str) -> None:
    elsewhere = _outside(tmp_path)
    before = _files(elsewhere)
    root = tmp_path / "out"
    (root / where).parent.mkdir(parents=True)
    (root / where).symlink_to(elsewhere, target_is_directory=True)
    store = LocalStore(root)
    key = f"{where}/x.json"
    for op in (
        lambda: store.get(key),
        lambda: store.exists(key),
        lambda: store.put(key, b"{}"),
        lambda: store.put(f"{where}/new.json", b"{}", if_absent=True),
        lambda: store.put(f"{where}/deeper/new.json", b"{}"),
        lambda: store.delete(key),
    ):
        with pytest.raises(UnsafePath, match="symbolic link .* never followed") as info:
            op()
        assert info.value.filename == str(root / where)
    assert list(store.list()) == [] and list(store.list(where + "/")) == []
    assert _files(elsewhere) == before


def test_a_child_store_does_not_follow_a_link_at_its_own_root(tmp_path: Path) -> None:
    """`LocalStore(out).child("cache")` is what a run's default cache is: {out}/cache as a link fails."""
    elsewhere = _outside(tmp_path)
    root = tmp_path / "out"
    root.mkdir()
    (root / "cache").symlink_to(elsewhere, target_is_directory=True)
    cache = LocalStore(root).child("cache")
    assert cache.uri("inversions/a") == str(root / "cache" / "inversions" / "a")
    with pytest.raises(UnsafePath):
        cache.put("inversions/a.safetensors", b"x")
    with pytest.raises(UnsafePath):
        cache.get("x.json")
    assert sorted(p.name for p in elsewhere.iterdir()) == ["x.json"]


def test_the_root_itself_may_be_a_link(tmp_path: Path) -> None:
    """An explicit --cache (or --out) naming a link is the user's choice: it is used."""
    real = tmp_path / "real-cache"
    real.mkdir()
    (tmp_path / "cache-link").symlink_to(real, target_is_directory=True)
    store = open_store(str(tmp_path / "cache-link"))
    assert store.put("inversions/a.safetensors", b"blob")
    assert (real / "inversions" / "a.safetensors").read_bytes() == b"blob"
    assert list(store.list()) == ["inversions/a.safetensors"]
    assert store.child("inversions").get("a.safetensors") == b"blob"


def test_a_link_in_an_objects_place_is_no_object(tmp_path: Path) -> None:
    """A planted sidecar link is not adopted: it does not exist, is not listed, cannot be read,
    and a write replaces the link itself (its target is untouched)."""
    elsewhere = _outside(tmp_path)
    root = tmp_path / "out"
    (root / "assets").mkdir(parents=True)
    (root / "assets" / "e1.json").symlink_to(elsewhere / "x.json")
    store = LocalStore(root)
    assert not store.exists("assets/e1.json")
    assert list(store.list("assets/")) == []
    with pytest.raises(UnsafePath, match="symbolic link"):
        store.get("assets/e1.json")
    assert store.put("assets/e1.json", b'{"real": 1}', if_absent=True)
    assert not (root / "assets" / "e1.json").is_symlink()
    assert store.get("assets/e1.json") == b'{"real": 1}'
    assert (elsewhere / "x.json").read_text() == '{"planted": true}'


def test_a_fifo_in_the_store_is_refused_without_blocking(tmp_path: Path) -> None:
    root = tmp_path / "out"
    (root / "runs" / "r").mkdir(parents=True)
    os.mkfifo(root / "runs" / "r" / "plan.json")
    store = LocalStore(root)
    assert not store.exists("runs/r/plan.json")
    assert list(store.list()) == []
    with pytest.raises(UnsafePath, match="is a FIFO, not a regular file"):
        _within(2.0, lambda: store.get("runs/r/plan.json"), root / "runs" / "r" / "plan.json")


def test_follow_links_store_reads_through_links(tmp_path: Path) -> None:
    """Stores that read inputs (a manifest folder) may follow links; a broken one is still skipped."""
    elsewhere = _outside(tmp_path)
    root = tmp_path / "m"
    root.mkdir()
    (root / "a.json").symlink_to(elsewhere / "x.json")
    (root / "gone.json").symlink_to(tmp_path / "nothing")
    store = open_store(str(root), follow_links=True)
    assert store.exists("a.json") and list(store.list()) == ["a.json"]
    assert store.get("a.json") == b'{"planted": true}'


# ---- sources: regular files only, without blocking
def _within(seconds: float, fn, fifo: Path | None = None):
    """`fn()` run in a thread that must finish within `seconds` (a FIFO reader blocked in open()
    is released by opening the FIFO's write end, so a failing test cannot hang the session)."""
    box: dict = {}

    def call() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            box["error"] = exc

    t = threading.Thread(target=call, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        if fifo is not None:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            os.close(fd)
        pytest.fail(f"still blocked after {seconds} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def test_a_fifo_source_is_refused_not_waited_on(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    with pytest.raises(NotRegularFile, match=r"fifo\.png is a FIFO, not a regular file"):
        _within(2.0, lambda: read_uri(str(fifo)), fifo)


def test_dev_zero_is_refused_at_once() -> None:
    t0 = time.perf_counter()
    with pytest.raises(NotRegularFile, match="/dev/zero is a character device, not a regular file"):
        read_uri("/dev/zero")
    assert time.perf_counter() - t0 < 1.0


def test_a_socket_and_a_folder_are_refused(tmp_path: Path) -> None:
    sock_path = tmp_path / "s.png"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(sock_path))
        with pytest.raises(NotRegularFile, match="is a socket, not a regular file"):
            read_uri(str(sock_path))
    with pytest.raises(NotRegularFile, match="is a folder, not a regular file"):
        read_uri(str(tmp_path))


def test_a_link_to_a_regular_file_is_an_ordinary_source(tmp_path: Path) -> None:
    (tmp_path / "real.png").write_bytes(b"pixels")
    (tmp_path / "link.png").symlink_to(tmp_path / "real.png")
    assert read_uri(str(tmp_path / "link.png")) == b"pixels"
    os.mkfifo(tmp_path / "f")
    (tmp_path / "to-fifo.png").symlink_to(tmp_path / "f")
    with pytest.raises(NotRegularFile, match="is a FIFO"):
        _within(2.0, lambda: read_uri(str(tmp_path / "to-fifo.png")), tmp_path / "f")
    with pytest.raises(NotFound):
        read_uri(str(tmp_path / "missing.png"))


# ---- the byte cap
def test_byte_cap_local(tmp_path: Path) -> None:
    p = tmp_path / "a.bin"
    p.write_bytes(b"x" * 100)
    assert read_uri(str(p), max_bytes=100) == b"x" * 100
    with pytest.raises(TooLarge, match=r"holds 100 bytes, over the cap of 99 bytes"):
        read_uri(str(p), max_bytes=99)
    assert len(read_uri(str(p))) == 100  # no cap unless asked


def test_byte_cap_s3(s3_bucket: str, s3_server: str) -> None:
    store = open_store(s3_bucket, s3_endpoint=s3_server)
    store.put("src/a.bin", b"y" * 1000)
    uri = store.uri("src/a.bin")
    assert read_uri(uri, s3_endpoint=s3_server, max_bytes=1000) == b"y" * 1000
    with pytest.raises(TooLarge, match=r"holds 1000 bytes, over the cap of 999 bytes"):
        read_uri(uri, s3_endpoint=s3_server, max_bytes=999)
    with pytest.raises(NotFound):
        read_uri(store.uri("src/none.bin"), s3_endpoint=s3_server, max_bytes=10)


# ---- file URIs
@pytest.mark.parametrize("name", ["space name.png", "100%.png", "é-ü.png", "a#b?.png"])
def test_percent_encoded_file_uri_is_decoded(tmp_path: Path, name: str) -> None:
    p = tmp_path / name
    p.write_bytes(b"data")
    assert read_uri(p.as_uri()) == b"data"
    assert read_uri(str(p)) == b"data"  # a plain path is taken literally


@pytest.mark.parametrize("uri", ["file:///tmp/a%00b.png", "/tmp/a\x00b.png", "s3://b/a\x00b"])
def test_nul_bytes_are_a_clear_error(uri: str) -> None:
    with pytest.raises(ValueError, match="NUL byte"):
        read_uri(uri)


# ---- the cache HMAC
def _blob(tensor: bytes = b"\x00" * 16) -> bytes:
    header = {
        "t": {"dtype": "F32", "shape": [len(tensor) // 4], "data_offsets": [0, len(tensor)]},
        "__metadata__": {"facts": "{}"},
    }
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + tensor


def _tampered(entry: bytes) -> bytes:
    """`entry` with a tensor byte changed and re-sealed, as a writer without the key would."""
    b = bytearray(entry)
    b[-1] ^= 0x01
    return seal(bytes(b))


def test_without_a_key_a_resealed_entry_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The checksum detects damage, not tampering (what the README says)."""
    monkeypatch.delenv(CACHE_KEY_ENV, raising=False)
    entry = seal(_blob())
    unseal(_tampered(entry))
    b = bytearray(entry)
    b[-1] ^= 0x01
    with pytest.raises(CorruptEntry, match="checksum mismatch"):
        unseal(bytes(b))


def test_with_a_key_only_entries_sealed_with_it_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CACHE_KEY_ENV, raising=False)
    unkeyed = seal(_blob())
    forged = _tampered(unkeyed)
    monkeypatch.setenv(CACHE_KEY_ENV, "k1-secret")
    keyed = seal(_blob())
    assert unseal(keyed) == keyed
    with pytest.raises(UntrustedEntry, match="no HMAC"):
        unseal(unkeyed)
    with pytest.raises(UntrustedEntry, match="no HMAC"):
        unseal(forged)
    header_n = int.from_bytes(keyed[:8], "little")
    header = json.loads(keyed[8 : 8 + header_n])
    assert "k1-secret" not in json.dumps(header)
    with pytest.raises(UntrustedEntry, match="HMAC mismatch"):  # re-sealed keeping the old MAC
        b = bytearray(keyed)
        b[-1] ^= 0x01
        meta = header["__metadata__"]
        forged_keyed = seal(bytes(b))
        n = int.from_bytes(forged_keyed[:8], "little")
        h = json.loads(forged_keyed[8 : 8 + n])
        h["__metadata__"]["editflow_hmac_sha256"] = meta["editflow_hmac_sha256"]
        text = json.dumps(h).encode()
        text += b" " * (-len(text) % 8)
        unseal(len(text).to_bytes(8, "little") + text + forged_keyed[8 + n :])
    b = bytearray(keyed)
    b[-1] ^= 0x01
    with pytest.raises(CorruptEntry, match="checksum mismatch"):  # damage is still damage
        unseal(bytes(b))
    monkeypatch.setenv(CACHE_KEY_ENV, "another-key")
    with pytest.raises(UntrustedEntry, match="HMAC mismatch"):
        unseal(keyed)
    monkeypatch.delenv(CACHE_KEY_ENV)
    assert unseal(keyed) == keyed  # keyed entries stay readable without a key


def test_blob_cache_recomputes_an_untrusted_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(CACHE_KEY_ENV, raising=False)
    cache = BlobCache(LocalStore(tmp_path / "cache"))
    cache.store.put("inversions/a.safetensors", _tampered(seal(_blob())))  # planted without the key
    monkeypatch.setenv(CACHE_KEY_ENV, "k1-secret")
    with pytest.raises(UntrustedEntry, match=r"a\.safetensors is not trusted"):
        cache.get("inversions/a.safetensors")
    assert cache.stats().misses == 1
    cache.replace("inversions/a.safetensors", _blob())
    assert cache.get("inversions/a.safetensors") is not None
    assert cache.stats().hits == 1
