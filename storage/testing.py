"""Settings for talking to a local S3-compatible test server (moto): fake credentials, no real endpoint.

Shared by the test suite and the benchmarks so that neither can reach a real AWS account.
"""

from __future__ import annotations

# Fake credentials and region for a local moto server.
FAKE_AWS_ENV: dict[str, str] = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}
# Variables cleared so that no profile or configured endpoint is used instead.
CLEARED_AWS_ENV: tuple[str, ...] = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
)
