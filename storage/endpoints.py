"""S3 addresses: endpoint URLs and bucket names checked before use, and credentials kept out of every
line that shows an endpoint.

An endpoint is ``http(s)://host[:port][/path]``. Credentials in it (``http://user:secret@host``, or a
query string such as ``?X-Amz-Credential=...``) are refused rather than stripped and used: a URL is
copied into plans, flow-run parameters, logs and error lines, an environment variable is not. Keys go
in ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (or a profile), as boto3 expects.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

__all__ = ["check_bucket", "check_endpoint", "redact"]

CREDENTIALS_HINT = (
    "put the keys in AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), not in the URL"
)
# userinfo after a scheme (`//user:pass@`), and a URL's query string: both may carry credentials
_USERINFO_RE = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://)[^/?#\s]*@")
# what boto3 sends at all (its own parameter check); stores differ in what they accept beyond that
_BUCKET_RE = re.compile(r"[A-Za-z0-9._\-]{1,255}")
_QUERY_RE = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^\s?#]*)\?[^\s#'\"]*")


def redact(text: str) -> str:
    """`text` with the userinfo and the query string of every URL in it replaced by ``***``."""
    text = _USERINFO_RE.sub(r"\g<head>***@", text)
    return _QUERY_RE.sub(r"\g<head>?***", text)


def check_endpoint(url: str, *, what: str = "--s3-endpoint") -> str:
    """`url` unchanged when it is a usable endpoint URL; else a ``ValueError`` naming `what` (the flag or
    variable it came from) that never repeats credentials."""
    shown = redact(url)
    try:
        parts = urlsplit(url)
        port = parts.port  # a ValueError for a port that is not a number in [0, 65535]
    except ValueError as exc:
        raise ValueError(f"{what}: {shown!r} is not a URL ({exc})") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ValueError(
            f"{what}: {shown!r} is not an endpoint URL; expected http(s)://host[:port]"
        )
    if parts.username is not None or parts.password is not None:
        raise ValueError(
            f"{what}: credentials in the URL are refused ({shown}); {CREDENTIALS_HINT}"
        )
    if parts.query or parts.fragment or url.rstrip().endswith(("?", "#")):
        raise ValueError(
            f"{what}: an endpoint URL takes no query string or fragment ({shown}); {CREDENTIALS_HINT}"
        )
    if port == 0 or any(c.isspace() for c in url):
        raise ValueError(f"{what}: {shown!r} is not an endpoint URL (bad port or whitespace)")
    return url


def check_bucket(bucket: str, *, what: str = "--out") -> str:
    """`bucket` unchanged when boto3 can send it; else a ``ValueError`` naming `what`."""
    if not _BUCKET_RE.fullmatch(bucket):
        raise ValueError(
            f"{what}: {bucket!r} is not an S3 bucket name (letters, digits, '.', '-' and '_' only)"
        )
    return bucket
