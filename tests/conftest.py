"""Shared test fixtures: a real S3 HTTP endpoint (moto server) for the session, fresh buckets,
local roots. Nothing here mocks boto3: clients talk HTTP to the endpoint as they would to AWS.
"""

from __future__ import annotations

import logging
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO_ROOT))

# Fake credentials and region for the moto endpoint; endpoint variables and profiles cleared so
# that nothing in the tests can reach a real account.
from storage.testing import CLEARED_AWS_ENV, FAKE_AWS_ENV  # noqa: E402


@pytest.fixture(scope="session")
def aws_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Fake AWS credentials in the environment for the whole session (restored afterwards)."""
    empty = tmp_path_factory.mktemp("aws") / "none"
    with pytest.MonkeyPatch.context() as mp:
        for name, value in FAKE_AWS_ENV.items():
            mp.setenv(name, value)
        for name in CLEARED_AWS_ENV:
            mp.delenv(name, raising=False)
        mp.setenv("AWS_CONFIG_FILE", str(empty))
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty))
        yield


@pytest.fixture(scope="session")
def s3_server(aws_env: None) -> Iterator[str]:
    """A moto S3 server on a free localhost port for the session; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_client(s3_server: str):
    """A boto3 S3 client for the moto endpoint (for arranging and inspecting objects)."""
    from storage.s3 import get_s3_client

    return get_s3_client(s3_server)


@pytest.fixture
def s3_bucket(s3_client) -> str:
    """A fresh, uniquely named bucket; returns ``s3://{bucket}/prefix``."""
    name = f"test-{uuid.uuid4().hex[:16]}"
    s3_client.create_bucket(Bucket=name)
    return f"s3://{name}/prefix"


@pytest.fixture
def local_root(tmp_path: Path) -> Path:
    """A fresh local folder to root a store at."""
    root = tmp_path / "store"
    root.mkdir()
    return root
