"""Planning a bulk edit: validate the manifest, skip finished edits, group rows by source, pack shards.

Rows are grouped by (image_uri, source_prompt, num_steps) so that each source image is inverted once per
run and all its targets are edited in one batch; groups are packed, in manifest order, into shards of at
most `shard_size` edits (a group larger than a shard is split, and its later shards find the inversion in
the cache). The plan is written under ``{out}/runs/{run_id}/``: ``plan.json`` and one Parquet file of
normalised rows per shard.
"""

from __future__ import annotations

import logging
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from editing.prompts import PromptBudget
from manifests import prepare_manifest
from manifests.schema import EditRow
from storage import keys
from storage.finished import FinishedIndex, load_finished
from storage.uri import open_store
from storage.writer import read_json, write_json, write_parquet
from tasks.errors import RunExists
from tasks.options import RunOptions
from tasks.results import results_table

logger = logging.getLogger(__name__)

# The source of an edit: rows with equal values here share one inversion (and one engine batch).
GROUP_COLUMNS = ("image_uri", "source_prompt", "num_steps")


def source_key(row: EditRow) -> tuple:
    """The row's :data:`GROUP_COLUMNS` values: the shard groups its rows by this, as planning does."""
    return tuple(getattr(row, c) for c in GROUP_COLUMNS)


def finished_assets(store) -> FinishedIndex:
    """The finished edits under output root `store`, from its index (:mod:`storage.finished`; no listing
    of ``assets/`` unless the root has no index yet)."""
    return load_finished(store)


def pack_shards(group_codes: np.ndarray, shard_size: int) -> np.ndarray:
    """Shard index per row: groups (in order of first appearance) packed into shards of <= shard_size rows."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    n = len(group_codes)
    shard_of = np.empty(n, dtype=np.int64)
    if n == 0:
        return shard_of
    order = np.argsort(group_codes, kind="stable")
    sizes = np.bincount(group_codes)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    shard, used = 0, 0
    for g in range(len(sizes)):  # group codes are numbered by first appearance
        size, start = int(sizes[g]), int(starts[g])
        if used and used + min(size, shard_size) > shard_size:
            shard, used = shard + 1, 0
        offset = 0
        while offset < size:
            take = min(size - offset, shard_size - used)
            shard_of[order[start + offset : start + offset + take]] = shard
            offset += take
            used += take
            if used == shard_size:
                shard, used = shard + 1, 0
    return shard_of


def claim_run(out, run_id: str, claim: str) -> None:
    """Take `run_id` under `out` by writing a placeholder plan.json first-writer-wins; ``RunExists``
    if another run has it (a retry of this planning, same `claim` token, may take it again)."""
    key = keys.plan_key(run_id)
    placeholder = {
        "run_id": run_id,
        "state": "planning",
        "claim": claim,
        "created": datetime.now(timezone.utc).isoformat(),
    }
    if write_json(out, key, placeholder, if_absent=True):
        return
    try:
        existing = read_json(out, key)
    except Exception:  # noqa: BLE001 - unreadable: it is still taken
        existing = {}
    if (
        isinstance(existing, dict)
        and existing.get("state") == "planning"
        and existing.get("claim") == claim
    ):
        return
    raise RunExists(
        f"run {run_id} already exists under {out.uri()} ({out.uri(key)}); choose another --run-id, "
        f"or finish that run with `editflow rerun {run_id} --out {out.uri()}`"
    )


def split_finished(norm: pa.Table, done: FinishedIndex) -> tuple[pa.Table, pa.Table]:
    """(pending, skipped): the normalised rows without and with a finished edit; an edit the index
    `done` holds counts as finished only while its image is still stored (:meth:`FinishedIndex.verify`)."""
    edit_ids = norm.column("edit_id").to_numpy(zero_copy_only=False)
    codes = done.lookup(edit_ids)
    finished = codes >= 0
    if finished.any():
        finished[finished] = done.verify(edit_ids[finished], codes[finished])
    return norm.filter(pa.array(~finished)), norm.filter(pa.array(finished))


def source_codes(rows: pa.Table) -> np.ndarray:
    """Each row's source group (numbered by first appearance) by :data:`GROUP_COLUMNS`."""
    if not rows.num_rows:
        return np.zeros(0, np.int64)
    frame = pd.DataFrame({c: rows.column(c).to_numpy(zero_copy_only=False) for c in GROUP_COLUMNS})
    return frame.groupby(list(GROUP_COLUMNS), sort=False).ngroup().to_numpy()


def write_shard_plans(
    out, run_id: str, pending: pa.Table, codes: np.ndarray, shard_size: int
) -> list[dict[str, int]]:
    """Pack `pending` (source groups `codes`) into shards, write each shard's rows; the plan's
    ``shards`` entries (index, edits, sources)."""
    shard_of = pack_shards(codes, shard_size)
    num_shards = int(shard_of.max()) + 1 if len(shard_of) else 0
    order = np.argsort(shard_of, kind="stable")
    bounds = np.searchsorted(shard_of[order], np.arange(num_shards + 1))
    members = [order[bounds[s] : bounds[s + 1]] for s in range(num_shards)]

    def write_shard(s: int) -> None:
        write_parquet(out, keys.shard_plan_key(run_id, s), pending.take(pa.array(members[s])))

    with ThreadPoolExecutor(max_workers=8) as pool:  # object-store writes are latency-bound
        list(pool.map(write_shard, range(num_shards)))
    return [
        {"index": s, "edits": len(idx), "sources": int(len(np.unique(codes[idx])))}
        for s, idx in enumerate(members)
    ]


def write_skipped(out, run_id: str, skipped: pa.Table, done: FinishedIndex) -> None:
    """The results rows of edits finished in earlier runs (status "skipped"), when there are any."""
    if not skipped.num_rows:
        return
    edit_ids = skipped.column("edit_id").to_pylist()
    rows = [
        {
            "edit_id": e,
            "status": "skipped",
            "output_uri": out.uri(done.image_key(e, int(code))),
            "metadata_uri": out.uri(keys.sidecar_key(e)),
            "error": "finished in an earlier run",
        }  # fmt: skip
        for e, code in zip(edit_ids, done.lookup(edit_ids))
    ]
    write_parquet(out, keys.skipped_results_key(run_id), results_table(rows, skipped))


def plan_run(
    manifest_uri: str,
    options: RunOptions,
    *,
    run_id: str,
    shard_size: int | None = None,
    claim: str | None = None,
    budget: PromptBudget | None = None,
) -> dict[str, Any]:
    """Validate (prompt lengths too when `budget` is given: the plan task passes the model's), claim
    the run id (``RunExists`` if taken), plan and write the plan; returns the plan (what ``plan.json``
    holds: ``shards`` lists each shard's index, edits and sources). `shard_size`: None = the options'."""
    t0 = time.perf_counter()
    shard_size = options.shard_size if shard_size is None else shard_size
    prepared = prepare_manifest(manifest_uri, s3_endpoint=options.s3_endpoint, budget=budget)
    norm = prepared.require_normalized()  # ManifestError listing every problem
    t_validate = time.perf_counter() - t0
    out = open_store(options.out, s3_endpoint=options.s3_endpoint)
    claim_run(out, run_id, claim or secrets.token_hex(8))
    done = finished_assets(out)
    pending, skipped = split_finished(norm, done)
    codes = source_codes(pending)
    shards = write_shard_plans(out, run_id, pending, codes, shard_size)
    write_skipped(out, run_id, skipped, done)
    plan = {
        "run_id": run_id,
        "manifest": manifest_uri,
        "created": datetime.now(timezone.utc).isoformat(),
        "options": options.to_dict(),
        "shard_size": shard_size,
        "rows": norm.num_rows,
        "pending": pending.num_rows,
        "skipped": skipped.num_rows,
        "sources": int(codes.max()) + 1 if len(codes) else 0,
        "passthrough": prepared.passthrough,
        "shards": shards,
        "seconds": {"validate": t_validate, "plan": time.perf_counter() - t0 - t_validate},
    }
    write_json(out, keys.plan_key(run_id), plan)
    logger.info(
        "planned run %s: %d edits (%d skipped) in %d shards",
        run_id, norm.num_rows, skipped.num_rows, len(shards),
    )  # fmt: skip
    return plan
