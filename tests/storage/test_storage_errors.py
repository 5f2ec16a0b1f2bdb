"""is_transient: which storage errors a Prefect retry_condition_fn should retry."""

from __future__ import annotations

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ParamValidationError,
    ReadTimeoutError,
)

from storage import NotFound, S3Store, is_transient


def _client_error(code: str, status: int) -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "PutObject",
    )


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (_client_error("SlowDown", 503), True),
        (_client_error("Throttling", 400), True),
        (_client_error("TooManyRequestsException", 429), True),
        (_client_error("InternalError", 500), True),
        (_client_error("ServiceUnavailable", 503), True),
        (_client_error("BadGateway", 502), True),
        (_client_error("RequestTimeout", 400), True),
        (_client_error("ConditionalRequestConflict", 409), True),
        (EndpointConnectionError(endpoint_url="http://x"), True),
        (ConnectionClosedError(endpoint_url="http://x"), True),
        (ReadTimeoutError(endpoint_url="http://x"), True),
        (ConnectTimeoutError(endpoint_url="http://x"), True),
        (ConnectionResetError(), True),
        (TimeoutError(), True),
        (NotFound("s3://b/k"), False),
        (_client_error("NoSuchKey", 404), False),
        (_client_error("AccessDenied", 403), False),
        (_client_error("InvalidRequest", 400), False),
        (_client_error("PreconditionFailed", 412), False),
        (ParamValidationError(report="bad"), False),
        (NoCredentialsError(), False),
        (ValueError("bad manifest"), False),
        (MemoryError(), False),
    ],
)
def test_is_transient(exc: BaseException, transient: bool) -> None:
    assert is_transient(exc) is transient


def test_is_transient_follows_cause() -> None:
    try:
        try:
            raise _client_error("SlowDown", 503)
        except ClientError as inner:
            raise RuntimeError("shard failed") from inner
    except RuntimeError as outer:
        assert is_transient(outer) is True


def test_real_errors_classified(s3_bucket: str, s3_server: str) -> None:
    bucket = s3_bucket.split("/")[2]
    with pytest.raises(NotFound) as missing:
        S3Store(bucket, "p", endpoint=s3_server).get("nope")
    assert is_transient(missing.value) is False
    with pytest.raises(ClientError) as no_bucket:
        S3Store("no-such-bucket-zz", "p", endpoint=s3_server).put("k", b"x")
    assert is_transient(no_bucket.value) is False


def test_unreachable_endpoint_is_transient() -> None:
    client = boto3.session.Session().client(  # no retries: fail fast
        "s3", endpoint_url="http://127.0.0.1:9", config=Config(retries={"max_attempts": 0})
    )  # port 9 (discard): connection refused
    store = S3Store("bucket", "p", client)
    with pytest.raises(Exception) as info:
        store.get("k")
    assert is_transient(info.value) is True


def test_bad_parameters_are_the_users_input_not_a_storage_failure():
    from storage.errors import is_bad_parameter

    assert is_bad_parameter(ParamValidationError(report="bad bucket"))
    assert not is_bad_parameter(ValueError("x")) and not is_bad_parameter(OSError(28, "full"))
