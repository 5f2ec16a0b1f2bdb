"""A content-addressed blob cache over any object store (the inversion and feature caches).

It holds safetensors blobs (e.g. the engine's ``Inversion.to_bytes()``) under keys from
:mod:`storage.keys`. Each entry is sealed on write with a SHA-256 of its header and tensor
bytes, stored in the safetensors metadata; :meth:`BlobCache.get` verifies it and raises
:class:`CorruptEntry` for an entry that fails (flipped bits, truncation, no checksum), so the
caller recomputes it and calls ``replace``. Writes are first-writer-wins.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from dataclasses import dataclass

from storage.base import NotFound, ObjectStore

__all__ = ["BlobCache", "CacheStats", "CorruptEntry", "seal", "unseal"]

logger = logging.getLogger(__name__)

CHECKSUM_KEY = "editflow_sha256"  # safetensors metadata entry holding the entry's checksum
_MAX_HEADER = 100_000_000  # the safetensors library's own header limit


class CorruptEntry(ValueError):
    """A cache entry whose bytes fail their checksum (or have none): recompute and replace it."""


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


def _checksum(header: dict, body: bytes) -> str:
    """SHA-256 over the header (without the checksum, canonical JSON) and the tensor bytes."""
    meta = {k: v for k, v in (header.get("__metadata__") or {}).items() if k != CHECKSUM_KEY}
    canon = dict(header, __metadata__=meta) if meta or "__metadata__" in header else dict(header)
    h = hashlib.sha256(json.dumps(canon, sort_keys=True, separators=(",", ":")).encode())
    h.update(b"\n")
    h.update(body)
    return h.hexdigest()


def seal(data: bytes) -> bytes:
    """`data` (a safetensors blob) with its checksum added to the metadata; tensors unchanged."""
    try:
        header, body = _split(data)
    except CorruptEntry as exc:
        raise ValueError(f"cache entries must be safetensors blobs: {exc}") from None
    meta = dict(header.get("__metadata__") or {})
    meta[CHECKSUM_KEY] = _checksum(header, body)
    text = json.dumps(dict(header, __metadata__=meta), separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads the header to 8-byte alignment
    return len(text).to_bytes(8, "little") + text + body


def unseal(data: bytes) -> bytes:
    """`data` if its checksum verifies, else ``CorruptEntry`` saying why."""
    header, body = _split(data)
    stored = (header.get("__metadata__") or {}).get(CHECKSUM_KEY)
    if stored is None:
        raise CorruptEntry(
            "entry has no checksum (written by an older editflow or not by editflow)"
        )
    actual = _checksum(header, body)
    if stored != actual:
        raise CorruptEntry(
            f"checksum mismatch: stored {str(stored)[:16]}..., content {actual[:16]}..."
        )
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
