"""A content-addressed blob cache over any object store (the inversion and feature caches).

It holds opaque bytes (e.g. the engine's ``Inversion.to_bytes()``) under keys from
:mod:`storage.keys`. Writes are first-writer-wins; ``replace`` overwrites an entry that was
found unreadable or mismatched.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from storage.base import NotFound, ObjectStore

__all__ = ["BlobCache", "CacheStats"]

logger = logging.getLogger(__name__)


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
        """The cached bytes, or None when there is no entry (other errors propagate)."""
        try:
            data = self.store.get(key)
        except NotFound:
            self._count("misses")
            logger.debug("cache miss %s", self.store.uri(key))
            return None
        self._count("hits")
        logger.debug("cache hit %s (%d bytes)", self.store.uri(key), len(data))
        return data

    def put(self, key: str, data: bytes) -> bool:
        """Store `data` unless an entry exists; True when this call wrote it."""
        written = self.store.put(key, data, if_absent=True)
        if written:
            self._count("writes")
            logger.debug("cached %s (%d bytes)", self.store.uri(key), len(data))
        else:
            logger.debug("cache entry %s already present; kept it", self.store.uri(key))
        return written

    def replace(self, key: str, data: bytes) -> None:
        """Overwrite the entry under `key` (used when the cached one was unreadable or mismatched)."""
        self.store.put(key, data)
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
