"""An S3-compatible object store through boto3 (AWS, MinIO, R2, moto...).

Clients use ``standard`` retries, checksums only ``when_required`` (boto3 >= 1.36 defaults
break some third-party stores) and path-style addressing for custom endpoints. Credentials
come from boto3's usual chain and are never logged.
"""

from __future__ import annotations

import logging
import mimetypes
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from storage.base import NotFound, ObjectStore, TooLarge, check_key
from storage.endpoints import check_endpoint

__all__ = [
    "S3Store",
    "read_s3_object",
    "get_s3_client",
    "make_s3_client",
    "resolve_endpoint",
    "clear_client_cache",
]

logger = logging.getLogger(__name__)

MAX_ATTEMPTS = 5  # boto3 'standard' retry attempts for throttling, 5xx and connection errors
CONFLICT_RETRIES = 4  # extra tries after a 409 ConditionalRequestConflict (AWS: retry them)
_NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound"}
_PRECONDITION_CODES = {"PreconditionFailed", "412"}
_CONFLICT_CODES = {"ConditionalRequestConflict", "409"}

_clients: dict[
    tuple[int, str | None], Any
] = {}  # (pid, endpoint): never share a client across fork
_clients_lock = threading.Lock()


def resolve_endpoint(endpoint: str | None = None) -> str | None:
    """The S3 endpoint: explicit, else ``AWS_ENDPOINT_URL_S3``, else ``AWS_ENDPOINT_URL``, else None;
    checked by :func:`storage.endpoints.check_endpoint` (no credentials in it)."""
    for what, value in (
        ("--s3-endpoint", endpoint),
        ("AWS_ENDPOINT_URL_S3", os.environ.get("AWS_ENDPOINT_URL_S3")),
        ("AWS_ENDPOINT_URL", os.environ.get("AWS_ENDPOINT_URL")),
    ):
        if value:
            return check_endpoint(value, what=what)
    return None


def make_s3_client(endpoint: str | None = None, *, max_attempts: int = MAX_ATTEMPTS) -> Any:
    """A new boto3 S3 client for `endpoint` (resolved with :func:`resolve_endpoint`)."""
    endpoint = resolve_endpoint(endpoint)
    config_kwargs: dict[str, Any] = {
        "retries": {"mode": "standard", "max_attempts": max_attempts},
        "request_checksum_calculation": "when_required",
        "response_checksum_validation": "when_required",
    }
    if endpoint:
        config_kwargs["s3"] = {"addressing_style": "path"}
    session = boto3.session.Session()  # sessions are not thread-safe: one per client
    logger.debug("creating S3 client for endpoint %s", endpoint or "(AWS default)")
    return session.client("s3", endpoint_url=endpoint, config=Config(**config_kwargs))


def get_s3_client(endpoint: str | None = None) -> Any:
    """The process-wide cached client for `endpoint` (boto3 clients are thread-safe)."""
    key = (os.getpid(), resolve_endpoint(endpoint))
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            client = _clients[key] = make_s3_client(key[1])
        return client


def clear_client_cache() -> None:
    """Forget cached clients (e.g. after credentials in the environment changed)."""
    with _clients_lock:
        _clients.clear()


def error_code(exc: ClientError) -> str:
    """The S3 error code of a ``ClientError`` ('NoSuchKey', '404', 'PreconditionFailed'...)."""
    return str(exc.response.get("Error", {}).get("Code", ""))


def error_status(exc: ClientError) -> int | None:
    """The HTTP status of a ``ClientError``, if known."""
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return int(status) if status is not None else None


def _is_not_found(exc: ClientError) -> bool:
    return error_code(exc) in _NOT_FOUND_CODES or error_status(exc) == 404


def read_s3_object(
    bucket: str, key: str, *, endpoint: str | None = None, max_bytes: int | None = None
) -> bytes:
    """The bytes of ``s3://bucket/key`` (any key S3 accepts); raises :class:`NotFound`.

    With ``max_bytes``: :class:`TooLarge` when the GET's ``ContentLength`` is over the cap, and at
    most ``max_bytes + 1`` bytes are read from the body (a server that under-reports is caught too).
    """
    uri = f"s3://{bucket}/{key}"
    try:
        response = get_s3_client(endpoint).get_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if _is_not_found(exc):
            raise NotFound(uri) from None
        raise
    body = response["Body"]
    if max_bytes is None:
        return body.read()
    try:
        size = response.get("ContentLength")
        if size is not None and size > max_bytes:
            raise TooLarge(uri, max_bytes, size)
        data = body.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise TooLarge(uri, max_bytes)
        return data
    finally:
        body.close()  # the rest of an oversized body is dropped with its connection, not read


def head_s3_object(bucket: str, key: str, *, endpoint: str | None = None) -> int:
    """The size of ``s3://bucket/key`` from a HEAD (no bytes read); raises :class:`NotFound`, or the
    ``ClientError`` of a refusal (403: denied)."""
    try:
        response = get_s3_client(endpoint).head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if _is_not_found(exc):
            raise NotFound(f"s3://{bucket}/{key}") from None
        raise
    return int(response.get("ContentLength") or 0)


class S3Store(ObjectStore):
    """Objects under ``s3://bucket/prefix``.

    ``client`` defaults to the cached client for ``endpoint`` (see :func:`resolve_endpoint`);
    ``page_size`` is the ``MaxKeys`` of each listing request (S3 caps it at 1000).
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        client: Any | None = None,
        *,
        endpoint: str | None = None,
        page_size: int = 1000,
    ) -> None:
        if not bucket or "/" in bucket:
            raise ValueError(f"bad S3 bucket name {bucket!r}")
        if not 1 <= page_size <= 1000:
            raise ValueError(f"page_size must be in [1, 1000], got {page_size}")
        prefix = check_key(prefix.strip("/"), allow_empty=True)
        self.bucket = bucket
        self.prefix = prefix + "/" if prefix else ""
        self.client = client if client is not None else get_s3_client(endpoint)
        self.page_size = page_size

    def _key(self, key: str) -> str:
        return self.prefix + check_key(key)

    def get(self, key: str) -> bytes:
        full = self._key(key)
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=full)
        except ClientError as exc:
            if _is_not_found(exc):
                raise NotFound(self.uri(key)) from None
            raise
        return response["Body"].read()

    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": self._key(key), "Body": data}
        content_type = mimetypes.guess_type(key)[0]
        if content_type:
            kwargs["ContentType"] = content_type
        if if_absent:
            kwargs["IfNoneMatch"] = "*"
        for attempt in range(CONFLICT_RETRIES + 1):
            try:
                self.client.put_object(**kwargs)
                return True
            except ClientError as exc:
                code, status = error_code(exc), error_status(exc)
                if if_absent and (code in _PRECONDITION_CODES or status == 412):
                    logger.debug("not overwriting existing %s", self.uri(key))
                    return False
                if (
                    if_absent
                    and (code in _CONFLICT_CODES or status == 409)
                    and attempt < CONFLICT_RETRIES
                ):
                    # a concurrent conditional write to the same key is in flight: try again
                    delay = 0.05 * 2**attempt
                    logger.info(
                        "conditional write conflict on %s; retrying in %.2fs", self.uri(key), delay
                    )
                    time.sleep(delay)
                    continue
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if _is_not_found(exc):
                return False
            raise
        return True

    def list(self, prefix: str = "") -> Iterator[str]:
        check_key(prefix, allow_empty=True)
        paginator = self.client.get_paginator("list_objects_v2")
        pages = paginator.paginate(
            Bucket=self.bucket,
            Prefix=self.prefix + prefix,
            PaginationConfig={"PageSize": self.page_size},
        )
        skip = len(self.prefix)
        for page in pages:
            for obj in page.get("Contents", []):
                key = obj["Key"]
                if not key.endswith("/"):  # folder markers made by some tools are not objects
                    yield key[skip:]

    def folders(self, prefix: str) -> Iterator[str]:
        check_key(prefix, allow_empty=True)
        if prefix and not prefix.endswith("/"):
            raise ValueError(f"a folder listing takes a prefix ending in '/', got {prefix!r}")
        paginator = self.client.get_paginator("list_objects_v2")
        full = self.prefix + prefix
        pages = paginator.paginate(
            Bucket=self.bucket,
            Prefix=full,
            Delimiter="/",
            PaginationConfig={"PageSize": self.page_size},
        )
        names = {
            cp["Prefix"][len(full) :].rstrip("/")
            for page in pages
            for cp in page.get("CommonPrefixes", [])
        }
        yield from sorted(n for n in names if n)

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def uri(self, key: str = "") -> str:
        if key:
            return f"s3://{self.bucket}/{self._key(key)}"
        return f"s3://{self.bucket}/{self.prefix}"

    def child(self, prefix: str) -> S3Store:
        prefix = check_key(prefix.strip("/"), allow_empty=True)
        return S3Store(self.bucket, self.prefix + prefix, self.client, page_size=self.page_size)

    def presigned_url(self, key: str, *, expires_s: int = 3600) -> str:
        """A time-limited HTTP(S) GET URL for `key` (for browser-facing links and artifacts)."""
        return self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._key(key)}, ExpiresIn=expires_s
        )
