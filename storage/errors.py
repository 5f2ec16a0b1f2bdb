"""Classifying storage errors: which ones are worth retrying (for Prefect's ``retry_condition_fn``)."""

from __future__ import annotations

import socket

from storage.base import NotFound

__all__ = ["is_transient"]

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
