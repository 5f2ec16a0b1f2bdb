"""Classifying storage errors: which ones are worth retrying (for Prefect's ``retry_condition_fn``),
and one-line descriptions of the ones a user must fix (endpoint down, no space, read-only, denied)."""

from __future__ import annotations

import errno
import socket

from storage.base import NotFound
from storage.endpoints import redact

__all__ = ["is_transient", "describe_storage_error"]

# S3 error codes that mean "try again later" (throttling, timeouts, server-side trouble).
TRANSIENT_CODES = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "SlowDown",
        "RequestLimitExceeded",
        "RequestThrottled",
        "RequestThrottledException",
        "TooManyRequestsException",
        "ProvisionedThroughputExceededException",
        "BandwidthLimitExceeded",
        "RequestTimeout",
        "RequestTimeoutException",
        "PriorRequestNotComplete",
        "InternalError",
        "InternalFailure",
        "ServiceUnavailable",
        "ServiceUnavailableException",
        "ConditionalRequestConflict",
    }
)


def _classify(exc: BaseException) -> bool | None:
    """True/False when `exc` itself is known to be transient or not; None when unknown."""
    if isinstance(exc, NotFound):
        return False
    try:
        from botocore import exceptions as bce
    except ImportError:  # pragma: no cover - boto3 is a dependency
        bce = None
    if bce is not None:
        if isinstance(exc, bce.ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in TRANSIENT_CODES:
                return True
            if status is not None and (int(status) >= 500 or int(status) in (408, 409, 429)):
                return True
            return False  # 403, 404, 400 validation, 412...: retrying gives the same answer
        if isinstance(
            exc,
            (
                bce.ConnectionError,
                bce.HTTPClientError,
                bce.IncompleteReadError,
                bce.ResponseStreamingError,
            ),
        ):
            return True  # endpoint unreachable, connection reset, read/connect timeouts
        if isinstance(exc, bce.BotoCoreError):
            return False  # e.g. NoCredentialsError, ParamValidationError
    if isinstance(exc, (ConnectionError, TimeoutError, socket.timeout)):
        return True
    return None


def is_transient(exc: BaseException) -> bool:
    """Whether retrying the operation that raised `exc` may succeed.

    True for throttling, 5xx, 408/409/429, connection errors and timeouts; False for
    :class:`~storage.NotFound`, 403, validation errors and anything unknown. Follows the
    ``raise ... from`` chain when `exc` itself is not a storage error.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        verdict = _classify(current)
        if verdict is not None:
            return verdict
        current = current.__cause__
    return False


_OS_ADVICE = {
    errno.ENOSPC: ("no space left on the device", "free some space or choose another location"),
    errno.EDQUOT: ("disk quota exceeded", "free some space or choose another location"),
    errno.EROFS: ("read-only file system", "choose a writable location"),
    errno.EACCES: ("permission denied", "choose a folder you can write, or fix its permissions"),
    errno.EPERM: (
        "operation not permitted",
        "choose a folder you can write, or fix its permissions",
    ),
    errno.ENAMETOOLONG: ("file name too long", "use shorter edit ids or a shorter --out path"),
    errno.ENOENT: ("no such file or directory", "choose a location whose folders can be created"),
    errno.ENOTDIR: ("a file is in the way of a folder", "choose a folder, not a file"),
    errno.EEXIST: ("a file is in the way of a folder", "choose a folder, not a file"),
    errno.EISDIR: ("a folder is in the way of a file", "choose another location"),
    errno.ELOOP: ("too many levels of symbolic links", "choose a location without symlinks"),
    errno.EIO: ("input/output error", "check the device"),
}


def is_bad_parameter(exc: BaseException) -> bool:
    """Whether boto3 refused a request's parameters before sending it (a bucket or key it cannot
    send): the user's input, not a storage failure."""
    from botocore.exceptions import ParamValidationError

    return isinstance(exc, ParamValidationError)


def describe_storage_error(exc: BaseException) -> str | None:
    """One line (what, where, what to do) for a storage failure the user must fix; None for others.

    Follows the ``raise ... from`` chain. Never includes credentials: the userinfo and query string of
    any URL in the line are replaced (:func:`storage.endpoints.redact`).
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        line = _describe(current)
        if line is not None:
            return redact(line)
        current = current.__cause__ or current.__context__
    return None


def _describe(exc: BaseException) -> str | None:
    try:
        from botocore import exceptions as bce
    except ImportError:  # pragma: no cover - boto3 is a dependency
        bce = None
    if bce is not None:
        if isinstance(exc, bce.EndpointConnectionError):
            return (f"cannot reach the S3 endpoint {exc.kwargs.get('endpoint_url', '')}: the connection failed; "
                    "check --s3-endpoint (or AWS_ENDPOINT_URL_S3) and that the server is up")  # fmt: skip
        if isinstance(exc, (bce.ConnectionError, bce.HTTPClientError)):
            return f"cannot talk to the S3 endpoint: {exc}; check --s3-endpoint and the network"
        if isinstance(exc, bce.NoCredentialsError):
            return "no AWS credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
        if isinstance(exc, bce.ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            bucket = exc.response.get("Error", {}).get("BucketName", "")
            op = getattr(exc, "operation_name", "request")
            if code == "NoSuchBucket":
                return f"S3 bucket {bucket or '(named in the s3:// URI)'} does not exist at this endpoint; create it or fix the s3:// URI"
            if code in (
                "AccessDenied",
                "403",
                "Forbidden",
                "InvalidAccessKeyId",
                "SignatureDoesNotMatch",
            ):
                return f"S3 refused {op} ({code}); check the credentials and their permissions on the bucket"
    if isinstance(exc, OSError) and exc.errno in _OS_ADVICE:
        what, todo = _OS_ADVICE[exc.errno]
        where = exc.filename or ""
        verb = "write" if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS) else "use"
        return (
            f"cannot {verb} {where}: {what}; {todo}"
            if where
            else f"{what}: {exc.strerror or exc}; {todo}"
        )
    return None
