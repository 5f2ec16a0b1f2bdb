"""editflow manifests: the format (one row per edit), validation that reports every problem,
loading from files, folders and S3 prefixes, normalising into `EditRow`s, and builders.

    from manifests import check_manifest, normalize, edit_rows
    table, problems = check_manifest("s3://bucket/manifests/", s3_endpoint=endpoint)
    rows = list(edit_rows(normalize(table)))
"""

from __future__ import annotations

from manifests.build import read_catalog, restyle_manifest
from manifests.schema import (
    DEFAULT_METHOD,
    DEFAULT_NUM_STEPS,
    DEFAULT_SEED,
    GUIDANCE_RANGE,
    KNOWN_COLUMNS,
    MANIFEST_SCHEMA,
    METHODS,
    NORMALIZED_SCHEMA,
    NUM_STEPS_RANGE,
    OPTIONAL_COLUMNS,
    REQUIRED_COLUMNS,
    RESERVED_COLUMNS,
    EditRow,
)
from manifests.validate import (
    ManifestError,
    Problem,
    check_manifest,
    edit_rows,
    format_problems,
    load_manifest,
    manifest_files,
    normalize,
    passthrough_columns,
    validate_table,
)

__all__ = [
    "DEFAULT_METHOD",
    "DEFAULT_NUM_STEPS",
    "DEFAULT_SEED",
    "GUIDANCE_RANGE",
    "KNOWN_COLUMNS",
    "MANIFEST_SCHEMA",
    "METHODS",
    "NORMALIZED_SCHEMA",
    "NUM_STEPS_RANGE",
    "OPTIONAL_COLUMNS",
    "REQUIRED_COLUMNS",
    "RESERVED_COLUMNS",
    "EditRow",
    "ManifestError",
    "Problem",
    "check_manifest",
    "edit_rows",
    "format_problems",
    "load_manifest",
    "manifest_files",
    "normalize",
    "passthrough_columns",
    "read_catalog",
    "restyle_manifest",
    "validate_table",
]
