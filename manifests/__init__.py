"""editflow manifests: the format (one row per edit), loading from files, folders and S3 prefixes,
validation that reports every problem, normalising into typed `EditRow`s, edit identity, builders.

    from manifests import edit_rows, format_problems, prepare_manifest
    prepared = prepare_manifest("s3://bucket/manifests/", s3_endpoint=endpoint, budget=budget)
    if prepared.problems:
        raise SystemExit(format_problems(prepared.problems))
    rows = list(edit_rows(prepared.normalized))

Modules: ``load`` (reading through ``storage``), ``validate`` (the checks), ``prompts`` (prompt
lengths, P2P words), ``normalise`` (normalised table, ``EditRow``s), ``prepare`` (all of it in one
pass, in memory), ``stream`` (the same checks batch by batch, in bounded memory: what ``validate``
and planning use), ``identity`` (derived edit ids), ``problems``, ``schema``, ``build``.
"""

from __future__ import annotations

from manifests.build import read_catalog, restyle_manifest
from manifests.identity import derive_edit_id, derive_edit_id_json
from manifests.load import load_manifest, manifest_files
from manifests.normalise import edit_rows, normalize, normalized_table, passthrough_columns
from manifests.prepare import PreparedManifest, prepare_manifest, prepare_table
from manifests.problems import ManifestError, Problem, format_problems
from manifests.prompts import prompt_length_problems
from manifests.schema import (
    DEFAULT_METHOD,
    DEFAULT_NUM_STEPS,
    DEFAULT_SEED,
    GUIDANCE_RANGE,
    KNOWN_COLUMNS,
    METHODS,
    NORMALIZED_SCHEMA,
    NUM_STEPS_RANGE,
    OPTIONAL_COLUMNS,
    REQUIRED_COLUMNS,
    RESERVED_COLUMNS,
    EditRow,
)
from manifests.stream import ManifestScan, open_manifest, scan_manifest
from manifests.validate import analyse, validate_table

__all__ = [
    "DEFAULT_METHOD",
    "DEFAULT_NUM_STEPS",
    "DEFAULT_SEED",
    "GUIDANCE_RANGE",
    "KNOWN_COLUMNS",
    "METHODS",
    "NORMALIZED_SCHEMA",
    "NUM_STEPS_RANGE",
    "OPTIONAL_COLUMNS",
    "REQUIRED_COLUMNS",
    "RESERVED_COLUMNS",
    "EditRow",
    "ManifestError",
    "ManifestScan",
    "PreparedManifest",
    "Problem",
    "analyse",
    "derive_edit_id",
    "derive_edit_id_json",
    "edit_rows",
    "format_problems",
    "load_manifest",
    "manifest_files",
    "normalize",
    "normalized_table",
    "open_manifest",
    "passthrough_columns",
    "prepare_manifest",
    "prepare_table",
    "prompt_length_problems",
    "read_catalog",
    "restyle_manifest",
    "scan_manifest",
    "validate_table",
]
