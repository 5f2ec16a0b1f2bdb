"""The results table of a run: one row per edit with its status, outputs, cost, edit QA and passthrough
columns; the edits its QA gate flagged (:func:`needs_review`) and the manifest that re-edits them
(:func:`review_manifest`, for ``editflow rerun RUN --needs-review``)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from manifests.schema import NORMALIZED_SCHEMA
from storage import keys
from storage.base import ObjectStore
from storage.writer import read_parquet, write_parquet

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
    # edit QA (editing.judge): the judge's text margin (null when not judged: --qa off, or the edit
    # did not succeed here) and why the edit needs review (null when it passed the run's gate)
    pa.field("qa_text", pa.float64()),
    pa.field("qa", pa.string()),
    # CLIP directional similarity of the edit (editing.clip_judge; null without --qa-model)
    pa.field("qa_clip", pa.float64()),
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
    qa_text, qa_clip, qa, output_uri (those the table has)."""
    if not results.num_rows or "qa" not in results.column_names:
        return []
    flagged = results.filter(
        pc.and_(pc.equal(results.column("status"), "succeeded"), pc.is_valid(results.column("qa")))
    )
    wanted = ("row", "edit_id", "method", "target_prompt", "qa_text", "qa_clip", "qa", "output_uri")
    rows = flagged.select([c for c in wanted if c in flagged.column_names]).to_pylist()
    rows.sort(key=lambda r: (_worst_first(r.get("qa_text")), r.get("row") or 0))
    return rows


# ----------------------------------------------------------------------------- rerun --needs-review

REVIEW_OF = "rerun_of"  # the review run's passthrough column: the edit id each edit re-edits


def review_run_id(run_id: str, settings: Mapping[str, Any]) -> str:
    """The run that re-edits `run_id`'s flagged edits with `settings`: the same command finds it again."""
    return keys.check_id(f"{run_id}-review-{keys.digest(dict(settings), length=8)}", what="run_id")


def review_manifest(
    store: ObjectStore, run_id: str, plan: Mapping[str, Any], settings: Mapping[str, Any]
) -> pa.Table:
    """A manifest of the edits of `run_id` its QA gate flagged, worst first, each as planned (its
    passthrough columns kept) with `settings` over its own settings, a new edit id (its own plus
    ``-`` and 8 hex digits of `settings`) and its original id in ``rerun_of``. One pass over the shards:
    each results file, and the plan of a shard that has flagged edits."""
    from tasks.planning import read_shard_plan  # planning imports this module's results schema

    suffix = keys.digest(dict(settings), length=8)
    order: dict[str, tuple[float, int]] = {}
    tables = []
    for shard in plan.get("shards", []):
        res_key = keys.shard_results_key(run_id, shard["index"])
        if not store.exists(res_key):
            continue
        flagged = needs_review(read_parquet(store, res_key))
        if not flagged:
            continue
        order |= {
            r["edit_id"]: (_worst_first(r.get("qa_text")), r.get("row") or 0) for r in flagged
        }
        table = read_shard_plan(store, run_id, shard["index"])
        ids = pa.array([r["edit_id"] for r in flagged], pa.string())
        tables.append(table.filter(pc.is_in(table.column("edit_id"), ids)))
    if not tables:
        return pa.table({})
    rows = pa.concat_tables(tables, promote_options="permissive").to_pylist()
    rows.sort(key=lambda r: order[r["edit_id"]])
    for r in rows:
        del r["row"]  # the review run numbers its own rows
        r[REVIEW_OF] = r["edit_id"]
        r["edit_id"] = f"{r['edit_id']}-{suffix}"
        r["settings"] = json.dumps(
            {**json.loads(r["settings"] or "{}"), **settings}, sort_keys=True
        )
    return pa.Table.from_pylist(rows)


def write_review_manifest(
    store: ObjectStore, run_id: str, plan: Mapping[str, Any], settings: Mapping[str, Any]
) -> dict[str, Any]:
    """Write :func:`review_manifest` as the manifest of run :func:`review_run_id` (unless that run is
    already planned: then it is finished instead); ``{"run_id", "manifest", "edits", "planned",
    "originals"}`` (`originals`: the edit id each manifest row re-edits)."""
    review = review_run_id(run_id, settings)
    planned = store.exists(keys.plan_key(review))
    key = keys.run_manifest_key(review)
    originals: list[str] = []
    if not planned:
        table = review_manifest(store, run_id, plan, settings)
        if table.num_rows:
            originals = table.column(REVIEW_OF).to_pylist()
            write_parquet(store, key, table)
    return {"run_id": review, "manifest": store.uri(key), "edits": len(originals),
            "planned": planned, "originals": originals}  # fmt: skip
