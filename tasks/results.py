"""The results table of a run: one row per edit with its status, outputs, cost, and passthrough columns."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from manifests.schema import NORMALIZED_SCHEMA

STATUSES = ("succeeded", "failed", "skipped")

RESULT_FIELDS = [
    pa.field("edit_id", pa.string(), nullable=False),
    pa.field("row", pa.int64()),
    pa.field("image_uri", pa.string()),
    pa.field("target_prompt", pa.string()),
    pa.field("method", pa.string()),
    pa.field("status", pa.string(), nullable=False),
    pa.field("output_uri", pa.string()),
    pa.field("metadata_uri", pa.string()),
    pa.field("error", pa.string()),  # why a failed edit failed
    pa.field("reason", pa.string()),  # why an edit was skipped (e.g. "finished in an earlier run")
    pa.field("cache_hit", pa.bool_()),
    pa.field("unet_evals", pa.float64()),
    pa.field("seconds", pa.float64()),
]
_FROM_SOURCE = ("row", "image_uri", "target_prompt", "method")


def results_table(rows: Sequence[dict[str, Any]], source: pa.Table) -> pa.Table:
    """Results for the edits of `source` (normalised manifest rows, same order as `rows`)."""
    if len(rows) != source.num_rows:
        raise ValueError(f"{len(rows)} results for {source.num_rows} manifest rows")
    for r in rows:
        if r.get("status") not in STATUSES:
            raise ValueError(
                f"edit {r.get('edit_id')}: status must be one of {STATUSES}, got {r.get('status')!r}"
            )
    arrays = []
    for f in RESULT_FIELDS:
        if f.name in _FROM_SOURCE:
            arrays.append(source.column(f.name).combine_chunks().cast(f.type))
        else:
            arrays.append(pa.array([r.get(f.name) for r in rows], f.type))
    fields = list(RESULT_FIELDS)
    known = {f.name for f in NORMALIZED_SCHEMA}
    for name in source.column_names:
        if name not in known:
            fields.append(source.schema.field(name))
            arrays.append(source.column(name).combine_chunks())
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))
