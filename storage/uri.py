"""URIs to stores: ``s3://bucket/prefix``, ``file:///abs/path`` or a plain (relative -> absolute) path.

A ``file://`` URI is percent-decoded (``file:///a/space%20name.png``, what ``Path.as_uri()``
writes); a plain path is taken literally. :func:`read_uri` reads only regular files (a FIFO,
device, socket or folder is refused without blocking) and, with ``max_bytes``, at most that
many bytes (local files and S3 objects alike).
"""

from __future__ import annotations

import errno
import os
import re
import stat
import urllib.parse
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

from storage.base import NotFound, NotRegularFile, ObjectStore, file_kind

__all__ = [
    "DEFAULT_MAX_SOURCE_BYTES",
    "SUPPORTED_SCHEMES",
    "split_uri",
    "open_store",
    "read_uri",
    "is_supported_uri",
    "check_writable",
    "check_readable",
    "unreadable_uris",
]

SUPPORTED_SCHEMES = ("s3://", "file://", "plain paths")  # for messages
# Bytes a source image may hold (200 MB): far above any photo a diffusion model edits (a 512 px PNG is
# < 1 MB, a 100 MP TIFF ~300 MB is beyond what the engine would resize anyway), far below memory.
DEFAULT_MAX_SOURCE_BYTES = 200_000_000
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
# The same rules as regular expressions, for vectorised checks of a whole manifest column.
SCHEME_PATTERN = r"^[A-Za-z][A-Za-z0-9+.\-]*://"
SUPPORTED_URI_PATTERN = r"^((?i:s3)://[^/]+/.+|(?i:file)://(localhost)?/.*)$"


def split_uri(uri: str) -> tuple[str, str, str]:
    """Split `uri` into ``(scheme, bucket, path)``.

    ``s3://b/k`` -> ``("s3", "b", "k")``; ``file:///a/b`` and plain paths -> ``("file", "",
    "/abs/path")`` (relative paths are made absolute against the working directory; a
    ``file://`` path is percent-decoded). Raises ``ValueError`` for other schemes, malformed
    URIs and NUL bytes (literal, or ``%00`` in a ``file://`` URI).
    """
    if not isinstance(uri, str) or not uri:
        raise ValueError(f"expected a URI or path, got {uri!r}")
    if "\x00" in uri:
        raise ValueError(f"URI contains a NUL byte: {uri!r}")
    match = _SCHEME_RE.match(uri)
    if match is None:
        return "file", "", os.path.abspath(os.path.expanduser(uri))
    scheme = match.group(1).lower()
    rest = uri[match.end() :]
    if scheme == "s3":
        bucket, _, key = rest.partition("/")
        if not bucket:
            raise ValueError(f"S3 URI has no bucket: {uri!r} (expected s3://bucket/prefix)")
        return "s3", bucket, key
    if scheme == "file":
        host, slash, path = rest.partition("/")
        if host not in ("", "localhost") or not slash:
            raise ValueError(f"file URI must be absolute (file:///abs/path), got {uri!r}")
        decoded = os.fsdecode(urllib.parse.unquote_to_bytes("/" + path))
        if "\x00" in decoded:
            raise ValueError(f"file URI decodes to a path with a NUL byte: {uri!r}")
        return "file", "", decoded
    raise ValueError(
        f"unsupported URI scheme {scheme + '://'!r} in {uri!r}; supported: s3://bucket/prefix, "
        "file:///abs/path or a plain path"
    )


def is_supported_uri(uri: str) -> bool:
    """Whether :func:`split_uri` accepts `uri` (an S3 URI must name a key, not just a bucket)."""
    if _SCHEME_RE.match(uri) is None:
        return bool(uri)
    return re.match(SUPPORTED_URI_PATTERN, uri) is not None


def open_store(
    uri: str, *, s3_endpoint: str | None = None, follow_links: bool = False
) -> ObjectStore:
    """The store rooted at `uri` (an S3 prefix or a local folder, created on first write).

    A local store follows no symbolic link below its root (see :mod:`storage.local`);
    ``follow_links=True`` is for stores that only read inputs (a manifest folder).
    """
    scheme, bucket, path = split_uri(uri)
    if scheme == "s3":
        from storage.s3 import S3Store  # boto3 is imported only when S3 is used

        return S3Store(bucket, path, endpoint=s3_endpoint)
    from storage.local import LocalStore

    return LocalStore(path, follow_links=follow_links)


def read_uri(uri: str, *, s3_endpoint: str | None = None, max_bytes: int | None = None) -> bytes:
    """The bytes of the single object or file at `uri`; raises :class:`~storage.NotFound`.

    Local: links are followed, but only a regular file is read (:class:`~storage.base.NotRegularFile`
    for a FIFO, device, socket or folder, found on the open descriptor without blocking). With
    ``max_bytes``, more than that many bytes raise :class:`~storage.base.TooLarge` after reading at
    most ``max_bytes + 1`` (S3: the size the GET reports, then a bounded read of the body).
    """
    scheme, bucket, path = split_uri(uri)
    if scheme == "s3":
        from storage.s3 import read_s3_object

        if not path or path.endswith("/"):
            raise ValueError(f"S3 URI names a prefix, not an object: {uri!r}")
        return read_s3_object(bucket, path, endpoint=s3_endpoint, max_bytes=max_bytes)
    from storage.local import read_file

    return read_file(path, max_bytes=max_bytes)


def check_readable(uri: str, *, s3_endpoint: str | None = None) -> None:
    """What :func:`read_uri` would refuse before reading, found without reading: :class:`~storage.NotFound`,
    :class:`~storage.base.NotRegularFile` (local, links followed), ``PermissionError`` (a local file
    this process may not read), or the store's error (S3: a HEAD's refusal, e.g. 403)."""
    scheme, bucket, path = split_uri(uri)
    if scheme == "s3":
        from storage.s3 import head_s3_object

        if not path or path.endswith("/"):
            raise ValueError(f"S3 URI names a prefix, not an object: {uri!r}")
        head_s3_object(bucket, path, endpoint=s3_endpoint)
        return
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise NotFound(path) from None
    if not stat.S_ISREG(mode):
        raise NotRegularFile(path, file_kind(mode))
    if not os.access(path, os.R_OK):
        raise PermissionError(errno.EACCES, f"{path} is not readable (permission denied)", path)


def unreadable_uris(
    uris: Iterable[str], *, s3_endpoint: str | None = None, threads: int = 16
) -> dict[str, Exception]:
    """Each distinct URI of `uris` that :func:`check_readable` refuses, with its exception (checks run
    `threads` at a time: a stat or HEAD is latency-bound)."""
    distinct = list(dict.fromkeys(uris))

    def check(uri: str) -> Exception | None:
        try:
            check_readable(uri, s3_endpoint=s3_endpoint)
        except Exception as exc:  # noqa: BLE001 - every refusal is reported with its URI
            return exc
        return None

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        found = list(pool.map(check, distinct))
    return {uri: exc for uri, exc in zip(distinct, found) if exc is not None}


def check_writable(uri: str, *, s3_endpoint: str | None = None) -> None:
    """Write and delete a small probe object at `uri`; raises the store's error when that fails
    (endpoint down, bucket missing, denied, read-only, full). S3: two attempts, not boto3's five."""
    import secrets

    scheme, bucket, path = split_uri(uri)
    if scheme == "s3":
        from storage.s3 import S3Store, make_s3_client

        store: ObjectStore = S3Store(bucket, path, make_s3_client(s3_endpoint, max_attempts=2))
    else:
        store = open_store(uri)
    key = f".editflow-write-check-{secrets.token_hex(6)}"
    store.put(key, b"ok")
    store.delete(key)
