"""The object-store interface: one ABC, interchangeable local-folder and S3 implementations.

Keys are relative, '/'-separated paths (``assets/abc.png``); a store is rooted at a folder or
an S3 prefix and :meth:`ObjectStore.child` gives a store rooted deeper.
"""

from __future__ import annotations

import abc
import errno
import stat
from collections.abc import Iterator

__all__ = [
    "MissingFile",
    "NotFound",
    "NotRegularFile",
    "ObjectStore",
    "TooLarge",
    "UnsafePath",
    "check_key",
    "file_kind",
]


class NotFound(KeyError):
    """No object under the requested key; the message names the full URI."""

    def __init__(self, uri: str) -> None:
        super().__init__(uri)
        self.uri = uri

    def __str__(self) -> str:  # KeyError would repr() the argument
        return f"no object at {self.uri}"


class MissingFile(NotFound):
    """No file at a local path read as an input (a source image): said in file words, with the
    absolute path (a relative one is resolved against the working folder, which the user may not see)."""

    def __str__(self) -> str:
        return f"no such file: {self.uri}"


class UnsafePath(PermissionError):
    """A path below a local store's root that editflow refuses to follow or read: a symbolic link
    (it could lead outside the root), or an entry that is not a regular file where an object is.
    A ``PermissionError`` (EACCES) naming the path, so a run's error boundary reports it as storage."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(errno.EACCES, message, path)
        self.message = message

    def __str__(self) -> str:
        return self.message


class NotRegularFile(ValueError):
    """An input (a source image, a catalog) that is not a regular file: a FIFO, a device, a socket
    or a folder. Only regular files are read: a FIFO would block, a device never ends."""

    def __init__(self, path: str, kind: str) -> None:
        super().__init__(f"{path} is {kind}, not a regular file")
        self.path = path
        self.kind = kind


class TooLarge(ValueError):
    """An input holding more bytes than the cap it was read with (nothing past cap + 1 is read)."""

    def __init__(self, uri: str, cap: int, size: int | None = None) -> None:
        held = f"{size} bytes" if size is not None else "more bytes"
        super().__init__(f"{uri} holds {held}, over the cap of {cap} bytes per source")
        self.uri = uri
        self.cap = cap


_KINDS = (
    (stat.S_ISLNK, "a symbolic link"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISREG, "a regular file"),
)


def file_kind(mode: int) -> str:
    """What an ``st_mode`` names, for messages: 'a FIFO', 'a character device', 'a folder'..."""
    return next((name for test, name in _KINDS if test(mode)), "an entry of unknown type")


def check_key(key: str, *, allow_empty: bool = False) -> str:
    """Return `key` if it is a safe relative '/'-separated key, else raise ``ValueError``.

    Rejected: absolute keys, backslashes, '.' or '..' segments, empty segments ('a//b'),
    control characters. ``allow_empty`` admits '' (the store's root, for prefixes).
    """
    if not isinstance(key, str):
        raise ValueError(f"object key must be a string, got {key!r}")
    if key == "":
        if allow_empty:
            return key
        raise ValueError("object key must not be empty")
    if key.startswith("/") or "\\" in key:
        raise ValueError(f"object key must be relative and use '/', got {key!r}")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in key):
        raise ValueError(f"object key must not contain control characters, got {key!r}")
    parts = key.split("/")
    if key.endswith("/"):  # a prefix such as 'runs/abc/' is fine; its last part is empty
        parts = parts[:-1]
    for part in parts:
        if part in ("", ".", ".."):
            raise ValueError(f"object key has an empty, '.' or '..' segment: {key!r}")
    return key


class ObjectStore(abc.ABC):
    """Bytes under keys. Implementations differ only in where the bytes go."""

    @abc.abstractmethod
    def get(self, key: str) -> bytes:
        """The object's bytes; raises :class:`NotFound` (naming the URI) when absent."""

    @abc.abstractmethod
    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        """Write `data` under `key`; returns True when written.

        With ``if_absent`` nothing is written and False is returned when the key already
        exists (the idempotent write: of two racing writers exactly one wins).
        """

    @abc.abstractmethod
    def exists(self, key: str) -> bool:
        """Whether an object is stored under `key`."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> Iterator[str]:
        """Keys starting with `prefix` (a plain string prefix, recursive), in sorted order."""

    def folders(self, prefix: str) -> Iterator[str]:
        """The names of the folders right below `prefix` (a key prefix ending in ``/``, or ""), sorted:
        a delimiter listing (S3's CommonPrefixes) that reads no key below them. This default derives
        them from :meth:`list` (every key below); the stores list only the one level."""
        check_key(prefix, allow_empty=True)
        yield from sorted(
            {
                k[len(prefix) :].split("/", 1)[0]
                for k in self.list(prefix)
                if "/" in k[len(prefix) :]
            }
        )

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object under `key`; deleting an absent key is not an error."""

    @abc.abstractmethod
    def uri(self, key: str = "") -> str:
        """The full URI of `key` (``s3://bucket/prefix/key`` or an absolute local path)."""

    @abc.abstractmethod
    def child(self, prefix: str) -> ObjectStore:
        """A store rooted at `prefix` below this one."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri()!r})"
