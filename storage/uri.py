"""URIs to stores: ``s3://bucket/prefix``, ``file:///abs/path`` or a plain (relative -> absolute) path."""

from __future__ import annotations

import os
import re
from pathlib import Path

from storage.base import NotFound, ObjectStore

__all__ = [
    "SUPPORTED_SCHEMES",
    "split_uri",
    "open_store",
    "read_uri",
    "is_supported_uri",
    "check_writable",
]

SUPPORTED_SCHEMES = ("s3://", "file://", "plain paths")  # for messages
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
# The same rules as regular expressions, for vectorised checks of a whole manifest column.
SCHEME_PATTERN = r"^[A-Za-z][A-Za-z0-9+.\-]*://"
SUPPORTED_URI_PATTERN = r"^((?i:s3)://[^/]+/.+|(?i:file)://(localhost)?/.*)$"


def split_uri(uri: str) -> tuple[str, str, str]:
    """Split `uri` into ``(scheme, bucket, path)``.

    ``s3://b/k`` -> ``("s3", "b", "k")``; ``file:///a/b`` and plain paths -> ``("file", "",
    "/abs/path")`` (relative paths are made absolute against the working directory).
    Raises ``ValueError`` for other schemes and malformed URIs.
    """
    if not isinstance(uri, str) or not uri:
        raise ValueError(f"expected a URI or path, got {uri!r}")
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
        return "file", "", "/" + path
    raise ValueError(
        f"unsupported URI scheme {scheme + '://'!r} in {uri!r}; supported: s3://bucket/prefix, "
        "file:///abs/path or a plain path"
    )


def is_supported_uri(uri: str) -> bool:
    """Whether :func:`split_uri` accepts `uri` (an S3 URI must name a key, not just a bucket)."""
    if _SCHEME_RE.match(uri) is None:
        return bool(uri)
    return re.match(SUPPORTED_URI_PATTERN, uri) is not None


def open_store(uri: str, *, s3_endpoint: str | None = None) -> ObjectStore:
    """The store rooted at `uri` (an S3 prefix or a local folder, created on first write)."""
    scheme, bucket, path = split_uri(uri)
    if scheme == "s3":
        from storage.s3 import S3Store  # boto3 is imported only when S3 is used

        return S3Store(bucket, path, endpoint=s3_endpoint)
    from storage.local import LocalStore

    return LocalStore(path)


def read_uri(uri: str, *, s3_endpoint: str | None = None) -> bytes:
    """The bytes of the single object or file at `uri`; raises :class:`~storage.NotFound`."""
    scheme, bucket, path = split_uri(uri)
    if scheme == "s3":
        from storage.s3 import read_s3_object

        if not path or path.endswith("/"):
            raise ValueError(f"S3 URI names a prefix, not an object: {uri!r}")
        return read_s3_object(bucket, path, endpoint=s3_endpoint)
    try:
        return Path(path).read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        raise NotFound(path) from None
    except IsADirectoryError:
        raise ValueError(f"{uri!r} is a folder, not a file") from None


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
