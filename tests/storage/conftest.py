"""Fixtures for the storage tests: the same tests run against a local folder and S3 (moto)."""

from __future__ import annotations

from pathlib import Path

import pytest

from storage import LocalStore, ObjectStore, open_store


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, local_root: Path) -> ObjectStore:
    """A fresh, empty store: a local folder or a prefix in a fresh S3 bucket."""
    if request.param == "local":
        return LocalStore(local_root)
    s3_server = request.getfixturevalue("s3_server")
    return open_store(request.getfixturevalue("s3_bucket"), s3_endpoint=s3_server)
