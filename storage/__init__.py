"""editflow's object storage: one interface over a local folder or S3, the key layout, the
inversion cache and the idempotent output writer. The only package that imports boto3.

    from storage import open_store, write_asset
    store = open_store("s3://bucket/out", s3_endpoint="http://localhost:9000")
    asset_uri, sidecar_uri, written = write_asset(store, edit_id, png, "png", metadata)
"""

from __future__ import annotations

import importlib
from typing import Any

from storage.base import NotFound, ObjectStore, check_key
from storage.cache import BlobCache, CacheStats
from storage.errors import is_transient
from storage.keys import (
    asset_key,
    canonical_json,
    check_id,
    digest,
    features_object_key,
    inversion_key,
    inversion_object_key,
    new_run_id,
    plan_key,
    run_file_key,
    run_prefix,
    sha256_hex,
    shard_plan_key,
    shard_results_key,
    sidecar_key,
    summary_key,
)
from storage.local import LocalStore
from storage.uri import is_supported_uri, open_store, read_uri, split_uri
from storage.writer import (
    encode_image,
    is_finished,
    json_bytes,
    png_bytes,
    read_json,
    read_parquet,
    to_jsonable,
    write_asset,
    write_json,
    write_parquet,
)

_LAZY = {  # boto3 is imported only when S3 is used
    "S3Store": "storage.s3",
    "get_s3_client": "storage.s3",
    "make_s3_client": "storage.s3",
    "resolve_endpoint": "storage.s3",
    "clear_client_cache": "storage.s3",
    "read_s3_object": "storage.s3",
}

__all__ = [
    "BlobCache",
    "CacheStats",
    "LocalStore",
    "NotFound",
    "ObjectStore",
    "asset_key",
    "canonical_json",
    "check_id",
    "check_key",
    "digest",
    "encode_image",
    "features_object_key",
    "inversion_key",
    "inversion_object_key",
    "is_finished",
    "is_supported_uri",
    "is_transient",
    "json_bytes",
    "new_run_id",
    "open_store",
    "plan_key",
    "png_bytes",
    "read_json",
    "read_parquet",
    "read_uri",
    "run_file_key",
    "run_prefix",
    "sha256_hex",
    "shard_plan_key",
    "shard_results_key",
    "sidecar_key",
    "split_uri",
    "summary_key",
    "to_jsonable",
    "write_asset",
    "write_json",
    "write_parquet",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'storage' has no attribute {name!r}")
