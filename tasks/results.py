"""The results table of a run: one row per edit with its status, outputs, cost, and passthrough columns."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from manifests.schema import NORMALIZED_SCHEMA

STATUSES = ("succeeded", "failed", "skipped")
QA_COLUMNS = ("qa_text", "qa")  # the edit-QA columns (see needs_review)

RESULT_FIELDS = [
    pa.field("edit_id", pa.string(), nullable=False),
    pa.field("row", pa.int64()),
    pa.field("image_uri", pa.string()),
    pa.field("target_prompt", pa.string()),
    pa.field("method", pa.string()),
    pa.field("status", pa.string(), nullable=False),
    pa.field("output_uri", pa.string()),
    pa.field("metadata_uri", pa.string()),
    pa.field("error", pa.string()),
    pa.field("cache_hit", pa.bool_()),
    pa.field("unet_evals", pa.float64()),
    pa.field("seconds", pa.float64()),
    # edit QA (editing.judge): the judge's text margin (null when not judged: --qa off, or the edit
    # did not succeed here) and why the edit needs review (null when it passed the run's gate)
    pa.field("qa_text", pa.float64()),
    pa.field("qa", pa.string()),
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


def _worst_first(value: float | None) -> float:
    """Sort key of a qa_text margin: unjudged (null) or unjudgeable (NaN) edits first, then lowest."""
    return value if value is not None and math.isfinite(value) else -math.inf


def needs_review(results: pa.Table) -> list[dict[str, Any]]:
    """The succeeded edits the run's QA gate flagged (a non-null ``qa``), worst first (lowest
    ``qa_text``; unjudged ones before all), then in manifest order: row, edit_id, method, target_prompt,
    qa_text, qa, output_uri (those the table has)."""
    if not results.num_rows or "qa" not in results.column_names:
        return []
    flagged = results.filter(
        pc.and_(pc.equal(results.column("status"), "succeeded"), pc.is_valid(results.column("qa")))
    )
    wanted = ("row", "edit_id", "method", "target_prompt", "qa_text", "qa", "output_uri")
    rows = flagged.select([c for c in wanted if c in flagged.column_names]).to_pylist()
    rows.sort(key=lambda r: (_worst_first(r.get("qa_text")), r.get("row") or 0))
    return rows
