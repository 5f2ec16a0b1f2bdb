"""A content-addressed blob cache over any object store (the inversion and feature caches).

It holds safetensors blobs (e.g. the engine's ``Inversion.to_bytes()``) under keys from
:mod:`storage.keys`. Each entry is sealed on write with a SHA-256 of its header and tensor
bytes, stored in the safetensors metadata; :meth:`BlobCache.get` verifies it and raises
:class:`CorruptEntry` for an entry that fails (flipped bits, truncation, no checksum), so the
caller recomputes it and calls ``replace``. Writes are first-writer-wins.

The checksum detects damage, not tampering: anyone who can write the cache can re-seal an
altered entry. With ``EDITFLOW_CACHE_KEY`` set (read from the environment of the process that
uses the cache, at each seal and unseal), entries also carry an HMAC-SHA256 with that key, and an
entry without a valid one (altered, re-sealed without the key, or sealed before a key was set)
is :class:`UntrustedEntry`: recomputed and replaced like a damaged one.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import threading
from dataclasses import dataclass

from storage.base import NotFound, ObjectStore

__all__ = [
    "CACHE_KEY_ENV",
    "BlobCache",
    "CacheStats",
    "CorruptEntry",
    "UntrustedEntry",
    "cache_key",
    "seal",
    "unseal",
]

logger = logging.getLogger(__name__)

CHECKSUM_KEY = "editflow_sha256"  # safetensors metadata entry holding the entry's checksum
MAC_KEY = "editflow_hmac_sha256"  # ... and the one holding its HMAC (only with a cache key)
CACHE_KEY_ENV = "EDITFLOW_CACHE_KEY"  # the secret the HMAC is keyed with (unset or '': no HMAC)
_SEALS = (CHECKSUM_KEY, MAC_KEY)  # metadata entries that no digest covers
_MAX_HEADER = 100_000_000  # the safetensors library's own header limit


class CorruptEntry(ValueError):
    """A cache entry whose bytes fail their checksum (or have none): recompute and replace it."""


class UntrustedEntry(CorruptEntry):
    """A cache entry without a valid HMAC for the cache key set: recompute and replace it."""


def cache_key() -> bytes | None:
    """The HMAC key from ``EDITFLOW_CACHE_KEY`` (its UTF-8 bytes), or None when it is unset or empty."""
    value = os.environ.get(CACHE_KEY_ENV, "")
    return value.encode("utf-8") if value else None


def _split(data: bytes) -> tuple[dict, bytes]:
    """(header, tensor bytes) of a safetensors blob; ``CorruptEntry`` if it is not one."""
    if len(data) < 8:
        raise CorruptEntry(f"{len(data)} bytes is too short for a safetensors blob")
    n = int.from_bytes(data[:8], "little")
    if n > min(_MAX_HEADER, len(data) - 8):
        raise CorruptEntry(f"safetensors header length {n} exceeds the {len(data)}-byte blob")
    try:
        header = json.loads(data[8 : 8 + n])
    except ValueError as exc:
        raise CorruptEntry(f"safetensors header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise CorruptEntry("safetensors header is not a JSON object")
    return header, data[8 + n :]


def _digest(header: dict, body: bytes, h) -> str:
    """`h` (a hashlib or hmac object) over the header (without the seals, canonical JSON) and the
    tensor bytes; its hex digest."""
    meta = {k: v for k, v in (header.get("__metadata__") or {}).items() if k not in _SEALS}
    canon = dict(header, __metadata__=meta) if meta or "__metadata__" in header else dict(header)
    h.update(json.dumps(canon, sort_keys=True, separators=(",", ":")).encode())
    h.update(b"\n")
    h.update(body)
    return h.hexdigest()


def _checksum(header: dict, body: bytes) -> str:
    """SHA-256 over the header (without the seals, canonical JSON) and the tensor bytes."""
    return _digest(header, body, hashlib.sha256())


def _mac(key: bytes, header: dict, body: bytes) -> str:
    """HMAC-SHA256 with `key` over what :func:`_checksum` covers."""
    return _digest(header, body, hmac.new(key, digestmod=hashlib.sha256))


def seal(data: bytes) -> bytes:
    """`data` (a safetensors blob) with its checksum added to the metadata, and its HMAC when
    ``EDITFLOW_CACHE_KEY`` is set; tensors unchanged."""
    try:
        header, body = _split(data)
    except CorruptEntry as exc:
        raise ValueError(f"cache entries must be safetensors blobs: {exc}") from None
    meta = {k: v for k, v in (header.get("__metadata__") or {}).items() if k not in _SEALS}
    meta[CHECKSUM_KEY] = _checksum(header, body)
    key = cache_key()
    if key is not None:
        meta[MAC_KEY] = _mac(key, header, body)
    text = json.dumps(dict(header, __metadata__=meta), separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads the header to 8-byte alignment
    return len(text).to_bytes(8, "little") + text + body


def unseal(data: bytes) -> bytes:
    """`data` if its checksum verifies (and, with ``EDITFLOW_CACHE_KEY`` set, its HMAC), else
    ``CorruptEntry`` (``UntrustedEntry`` for the HMAC) saying why."""
    header, body = _split(data)
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise CorruptEntry("safetensors metadata is not a JSON object")
    stored = meta.get(CHECKSUM_KEY)
    if stored is None:
        raise CorruptEntry(
            "entry has no checksum (written by an older editflow or not by editflow)"
        )
    actual = _checksum(header, body)
    if stored != actual:
        raise CorruptEntry(
            f"checksum mismatch: stored {str(stored)[:16]}..., content {actual[:16]}..."
        )
    key = cache_key()
    if key is not None:
        mac = meta.get(MAC_KEY)
        if not isinstance(mac, str):
            raise UntrustedEntry(f"entry has no HMAC, and {CACHE_KEY_ENV} is set")
        if not hmac.compare_digest(mac.encode(), _mac(key, header, body).encode()):
            raise UntrustedEntry(f"HMAC mismatch for the key in {CACHE_KEY_ENV}")
    return data


@dataclass(frozen=True)
class CacheStats:
    """Counters of one :class:`BlobCache` since it was made."""

    hits: int = 0  # get() found the entry
    misses: int = 0  # get() found nothing
    writes: int = 0  # put() stored a new entry
    replaced: int = 0  # replace() overwrote an entry


class BlobCache:
    """Opaque bytes under deterministic keys in `store`, with hit/miss counters (thread-safe)."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._counts = {"hits": 0, "misses": 0, "writes": 0, "replaced": 0}

    def _count(self, name: str) -> None:
        with self._lock:
            self._counts[name] += 1

    def get(self, key: str) -> bytes | None:
        """The cached bytes, or None when there is no entry; :class:`CorruptEntry` when the entry
        fails its checksum (counted as a miss; the caller recomputes and calls :meth:`replace`)."""
        try:
            data = self.store.get(key)
        except NotFound:
            self._count("misses")
            logger.debug("cache miss %s", self.store.uri(key))
            return None
        try:
            unseal(data)
        except UntrustedEntry as exc:
            self._count("misses")
            raise UntrustedEntry(
                f"cache entry {self.store.uri(key)} is not trusted: {exc}"
            ) from None
        except CorruptEntry as exc:
            self._count("misses")
            raise CorruptEntry(f"cache entry {self.store.uri(key)} is corrupt: {exc}") from None
        self._count("hits")
        logger.debug("cache hit %s (%d bytes)", self.store.uri(key), len(data))
        return data

    def put(self, key: str, data: bytes) -> bool:
        """Store `data` unless an entry exists; True when this call wrote it."""
        written = self.store.put(key, seal(data), if_absent=True)
        if written:
            self._count("writes")
            logger.debug("cached %s (%d bytes)", self.store.uri(key), len(data))
        else:
            logger.debug("cache entry %s already present; kept it", self.store.uri(key))
        return written

    def replace(self, key: str, data: bytes) -> None:
        """Overwrite the entry under `key` (used when the cached one was unreadable or mismatched)."""
        self.store.put(key, seal(data))
        self._count("replaced")
        logger.warning("replaced cache entry %s", self.store.uri(key))

    def exists(self, key: str) -> bool:
        """Whether an entry exists (does not count as a hit or miss)."""
        return self.store.exists(key)

    def stats(self) -> CacheStats:
        """A snapshot of the counters."""
        with self._lock:
            return CacheStats(**self._counts)

    def __repr__(self) -> str:
        return f"BlobCache({self.store!r})"
