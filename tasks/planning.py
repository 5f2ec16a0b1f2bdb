"""Planning a bulk edit: validate the manifest, skip finished edits, group rows by source, pack shards.

Rows are grouped by (image_uri, source_prompt, num_steps) so that each source image is inverted once per
run and all its targets are edited in one batch; groups are packed, in manifest order, into shards of at
most `shard_size` edits (a group larger than a shard is split, and its later shards find the inversion in
the cache). The plan is written under ``{out}/runs/{run_id}/``: ``plan.json`` and the normalised rows
of the shards, 64 shards to a Parquet file (:func:`read_shard_plan` reads one shard's). The manifest is
streamed in batches (``manifests.stream``), so planning's memory is bounded by a batch and a few bytes
per row, not by the manifest.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa

from manifests.normalise import normalized_table
from manifests.schema import EditRow
from manifests.stream import (
    BATCH_ROWS,
    CheckedBatch,
    ManifestScan,
    ManifestSource,
    hash_strings,
    mix_hashes,
    open_manifest,
)
from manifests.validate import analyse
from storage import keys
from storage.base import NotFound
from storage.finished import FinishedIndex, load_finished
from storage.uri import open_store
from storage.writer import read_json, read_parquet, write_json, write_parquet
from tasks.errors import RunExists
from tasks.options import DEFAULT_SHARD_SIZE, RunOptions
from tasks.results import results_table

if TYPE_CHECKING:  # the tokenizer's module imports torch: not needed to plan
    from editing.prompts import PromptBudget

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


# The automatic shard size (RunOptions.shard_size None): at least MIN_AUTO_SHARD_SIZE edits, and
# enough that a run has at most ~MAX_AUTO_SHARDS shards (each shard is a task: Prefect's API and the
# plan grow with their number; 10k keeps both small while still spreading a 10M-edit run).
MIN_AUTO_SHARD_SIZE = DEFAULT_SHARD_SIZE
MAX_AUTO_SHARDS = 10_000


def auto_shard_size(rows: int) -> int:
    """The shard size planning picks for `rows` pending edits when none is given:
    max(:data:`MIN_AUTO_SHARD_SIZE`, ceil(rows / :data:`MAX_AUTO_SHARDS`))."""
    return max(MIN_AUTO_SHARD_SIZE, -(-rows // MAX_AUTO_SHARDS))


def pack_shards(group_codes: np.ndarray, shard_size: int) -> np.ndarray:
    """Shard index per row: groups (in order of first appearance) packed into shards of <= shard_size rows.

    A group starts a new shard when it does not fit in what the current one has left (a group larger
    than a shard fills whole shards from a fresh one, its rest starting the next). The walk takes
    each shard's run of whole groups at once (a binary search of the groups' cumulative sizes), so it
    steps per shard, not per group; rows are then placed at once."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    n = len(group_codes)
    if n == 0:
        return np.empty(0, dtype=np.int64)
    sizes = np.bincount(group_codes)  # group codes are numbered by first appearance
    before = np.concatenate([[0], np.cumsum(sizes)])  # rows of the groups before each group
    # per group: the position of its first row (shard * shard_size + rows already in that shard)
    first = np.empty(len(sizes), np.int64)
    g, shard, used = 0, 0, 0
    while g < len(sizes):
        if used == 0 and sizes[g] >= shard_size:  # a group filling a shard or more
            first[g] = shard * shard_size
            shard, used = divmod(shard * shard_size + int(sizes[g]), shard_size)
            g += 1
            continue
        # the groups from g that fit in what the shard has left
        end = int(np.searchsorted(before, before[g] + shard_size - used, side="right")) - 1
        if end == g:  # group g does not fit: a fresh shard
            shard, used = shard + 1, 0
            continue
        first[g:end] = shard * shard_size + used + before[g:end] - before[g]
        shard, used = divmod(shard * shard_size + used + int(before[end] - before[g]), shard_size)
        g = end
    shard_of = first[group_codes] // shard_size
    # the rows of a group that spans shards: its k-th row goes to (first + k) // shard_size
    spans = (first % shard_size + sizes > shard_size)[group_codes]
    if spans.any():
        rows = np.flatnonzero(spans)
        codes = group_codes[rows]
        order = np.argsort(codes, kind="stable")
        ordered = codes[order]
        starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
        rank = np.arange(len(rows)) - np.repeat(starts, np.diff(np.r_[starts, len(rows)]))
        shard_of[rows[order]] = (first[ordered] + rank) // shard_size
    return shard_of


def claim_run(out, run_id: str, claim: str, s3_endpoint: str | None = None) -> None:
    """Take `run_id` under `out` by writing a placeholder plan.json first-writer-wins; ``RunExists``
    if another run has it (a retry of this planning, same `claim` token, may take it again); its hint
    names `s3_endpoint` when the run was given one."""
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
    raise RunExists.of(run_id, out.uri(), out.uri(key), s3_endpoint)


def split_finished(norm: pa.Table, done: FinishedIndex) -> tuple[pa.Table, pa.Table]:
    """(pending, skipped): the normalised rows without and with a finished edit; an edit the index
    `done` holds counts as finished only while its image is still stored (:meth:`FinishedIndex.verify`)."""
    if not len(done):
        return norm, norm.slice(0, 0)
    edit_ids = norm.column("edit_id").to_numpy(zero_copy_only=False)
    codes = done.lookup(edit_ids)
    finished = codes >= 0
    if finished.any():
        finished[finished] = done.verify(edit_ids[finished], codes[finished])
    return norm.filter(pa.array(~finished)), norm.filter(pa.array(finished))


def first_appearance_codes(keys: np.ndarray) -> np.ndarray:
    """Per row, the number of its key in order of first appearance (0, 1, 2, ...)."""
    codes, _ = pd.factorize(keys, sort=False)  # a hash table: no sorted copies of the keys
    return codes.astype(np.int64, copy=False)


def group_keys(batch: CheckedBatch) -> np.ndarray:
    """A 64-bit hash of each row's :data:`GROUP_COLUMNS` values (image_uri, source_prompt,
    num_steps): rows with equal values share it. A collision (p ~ rows^2 / 2^65) would only put
    two sources in one shard, which groups its rows by :func:`source_key` itself."""
    arrays, values = batch.analysis.arrays, batch.analysis.values
    uri, prompt = (
        batch.hashes.get(c) if c in batch.hashes else hash_strings(arrays[c])
        for c in ("image_uri", "source_prompt")
    )
    return mix_hashes(uri, prompt, values.num_steps)


# Schema metadata of a shard-plan part: how many rows each of its shards has (rows sorted by shard).
SHARD_ROWS_METADATA_KEY = b"editflow.shard_rows"


class ShardWriter:
    """Shard plans written as soon as all their rows have been seen (rows in manifest order), a part
    of :data:`storage.keys.SHARDS_PER_PLAN_PART` shards per file (a file per shard made planning's
    writes cost more than the rest of it); a few threads write, a bounded number at once."""

    def __init__(self, out, run_id: str, shard_of: np.ndarray, *, threads: int = 2) -> None:
        self.out, self.run_id, self.shard_of = out, run_id, shard_of
        self.per_part = keys.SHARDS_PER_PLAN_PART
        per_shard = np.bincount(shard_of)
        self.shards = len(per_shard)
        starts = np.arange(0, self.shards, self.per_part)
        # rows still to come, per part
        self.remaining = np.add.reduceat(per_shard, starts) if self.shards else per_shard
        self.cursor = 0  # pending rows seen so far
        self.buffers: dict[int, list[tuple[pa.Table, np.ndarray]]] = {}  # part -> (rows, shards)
        self.pool = ThreadPoolExecutor(max_workers=threads)  # object-store writes wait on latency
        self.in_flight: list[Future] = []
        self.window = threads  # each part in flight holds ~3 copies of its rows

    def add(self, pending: pa.Table) -> None:
        """The next pending rows (in manifest order); writes the parts they complete."""
        k = pending.num_rows
        shards = self.shard_of[self.cursor : self.cursor + k]
        parts = shards // self.per_part
        if len(shards) != k:
            raise RuntimeError("more pending rows than were planned (the manifest changed?)")
        self.cursor += k
        order = np.argsort(parts, kind="stable")
        ordered = parts[order]
        starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]]) if k else []
        for a, b in zip(starts, [*starts[1:], k]):
            p, rows = int(ordered[a]), order[a:b]
            if self.remaining[p] == b - a and rows[-1] - rows[0] == b - a - 1:
                # completes its part, which is written now: no copy
                piece = pending.slice(int(rows[0]), b - a)
            else:  # a copy, so that a part waiting for its other rows pins no whole batch
                piece = pending.take(pa.array(rows))
            self.buffers.setdefault(p, []).append((piece, shards[rows]))
            self.remaining[p] -= b - a
            if self.remaining[p] == 0:
                self._write(p, self.buffers.pop(p))

    def _write(self, p: int, pieces: list[tuple[pa.Table, np.ndarray]]) -> None:
        while len(self.in_flight) >= self.window:
            self.in_flight.pop(0).result()
        self.in_flight.append(self.pool.submit(self._write_part, p, pieces))

    def _write_part(self, p: int, pieces: list[tuple[pa.Table, np.ndarray]]) -> None:
        """Part `p`: its rows sorted by shard (manifest order within a shard), the rows per shard in
        the schema metadata (:data:`SHARD_ROWS_METADATA_KEY`)."""
        table = pa.concat_tables([t for t, _ in pieces])
        shards = np.concatenate([s for _, s in pieces])
        first = p * self.per_part
        if len(shards) > 1 and (shards[1:] < shards[:-1]).any():
            table = table.take(pa.array(np.argsort(shards, kind="stable")))
        counts = np.bincount(shards - first, minlength=min(self.per_part, self.shards - first))
        metadata = dict(table.schema.metadata or {})
        metadata[SHARD_ROWS_METADATA_KEY] = json.dumps(counts.tolist())
        key = keys.shard_plan_part_key(self.run_id, first)
        write_parquet(self.out, key, table.replace_schema_metadata(metadata))

    def close(self) -> None:
        """Wait for every write (raising the first error); every planned row must have come."""
        try:
            for future in self.in_flight:
                future.result()
        finally:
            self.pool.shutdown(wait=True)
        if self.cursor != len(self.shard_of) or self.buffers:
            raise RuntimeError("fewer pending rows than were planned (the manifest changed?)")


def read_shard_plan(out, run_id: str, shard_index: int) -> pa.Table:
    """The planned rows of shard `shard_index` of `run_id` (its slice of its plan part), as planning
    wrote them; ``NotFound`` when the run has no such shard.

    A run planned before plan parts has a file per shard (:func:`storage.keys.shard_plan_key`): that is
    read when there, which costs a newer run one missed read per shard task (nothing beside its edits)."""
    try:
        return read_parquet(out, keys.shard_plan_key(run_id, shard_index))
    except NotFound:
        pass
    part = read_parquet(out, keys.shard_plan_part_key(run_id, shard_index))
    metadata = dict(part.schema.metadata or {})
    counts = json.loads(metadata.pop(SHARD_ROWS_METADATA_KEY, b"[]"))
    position = shard_index % keys.SHARDS_PER_PLAN_PART
    if position >= len(counts):
        raise NotFound(out.uri(keys.shard_plan_key(run_id, shard_index)))
    start = sum(counts[:position])
    return part.slice(start, counts[position]).replace_schema_metadata(metadata or None)


def shard_entries(shard_of: np.ndarray, codes: np.ndarray) -> list[dict[str, int]]:
    """The plan's ``shards`` entries: index, edits and distinct sources of each shard (a source's rows
    fill consecutive shards (:func:`pack_shards`), so each source counts in the shards from its
    lowest to its highest)."""
    if not len(shard_of):
        return []
    edits = np.bincount(shard_of)
    n_groups = int(codes.max()) + 1
    lowest = np.full(n_groups, len(edits), np.int64)
    np.minimum.at(lowest, codes, shard_of)
    highest = np.zeros(n_groups, np.int64)
    np.maximum.at(highest, codes, shard_of)
    change = np.bincount(lowest, minlength=len(edits) + 1)
    change -= np.bincount(highest + 1, minlength=len(edits) + 1)
    sources = np.cumsum(change)[: len(edits)]
    return [
        {"index": s, "edits": int(e), "sources": int(n)}
        for s, (e, n) in enumerate(zip(edits.tolist(), sources.tolist(), strict=True))
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
            "reason": "finished in an earlier run",
        }  # fmt: skip
        for e, code in zip(edit_ids, done.lookup(edit_ids))
    ]
    write_parquet(out, keys.skipped_results_key(run_id), results_table(rows, skipped))


def _normalized_batches(source: ManifestSource, batch_rows: int) -> Iterator[pa.Table]:
    """The normalised rows of a manifest already found valid, batch by batch."""
    for first_row, table in source.batches(batch_rows):
        yield normalized_table(table, analyse(table, duplicates=False), first_row=first_row)


def plan_run(
    manifest_uri: str,
    options: RunOptions,
    *,
    run_id: str,
    shard_size: int | None = None,
    claim: str | None = None,
    budget: PromptBudget | None = None,
    batch_rows: int = BATCH_ROWS,
) -> dict[str, Any]:
    """Validate (prompt lengths too when `budget` is given: the plan task passes the model's), claim
    the run id (``RunExists`` if taken), plan and write the plan; returns the plan (what ``plan.json``
    holds: ``shards`` lists each shard's index, edits and sources; ``shard_size`` the size used).
    `shard_size`: None = the options'; when that is None too, :func:`auto_shard_size` of the pending
    edits.

    The manifest is streamed in batches of `batch_rows`: (1) every batch is checked and each row's
    source reduced to a 64-bit key; (2) an invalid manifest raises ``ManifestError`` (the first
    problems, all counted per kind) before anything is written; (3) the run id is claimed and the
    finished edits found; (4) the pending rows' sources are packed into shards; (5) the manifest
    is read again and each part of shards written as soon as all its rows are seen. Memory holds a batch,
    ~24 bytes per row and the shards not yet complete, not the manifest."""
    t0 = time.perf_counter()
    shard_size = options.shard_size if shard_size is None else shard_size
    if shard_size is not None and shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    # 1. Check every batch; keep each row's source key while the manifest is valid
    source = open_manifest(manifest_uri, s3_endpoint=options.s3_endpoint)
    scan = ManifestScan(source, budget=budget, batch_rows=batch_rows)
    sources: list[np.ndarray] = []
    for batch in scan.batches():
        if scan.total:
            sources.clear()  # invalid: nothing will be planned, keep counting problems only
            continue
        sources.append(group_keys(batch))
    scan.finish()
    # 2. An invalid manifest: every problem counted, nothing written
    scan.raise_if_invalid()
    source_key_of_row = np.concatenate(sources) if sources else np.zeros(0, np.uint64)
    del sources
    t_validate = time.perf_counter() - t0
    # 3. Claim the run id; the edits finished in earlier runs
    out = open_store(options.out, s3_endpoint=options.s3_endpoint)
    claim_run(out, run_id, claim or secrets.token_hex(8), options.s3_endpoint)
    done = finished_assets(out)
    pending = np.ones(source.rows, bool)
    if done:
        pending[:] = False
        for norm in _normalized_batches(source, batch_rows):
            todo, _ = split_finished(norm, done)
            pending[todo.column("row").to_numpy()] = True
    # 4. Pack the pending rows' sources (numbered by first appearance) into shards
    codes = first_appearance_codes(source_key_of_row[pending])
    del source_key_of_row
    if shard_size is None:
        shard_size = auto_shard_size(len(codes))
    shard_of = pack_shards(codes, shard_size)
    shards = shard_entries(shard_of, codes)
    # 5. Read again; write each shard's rows once all are seen, and the skipped rows
    writer = ShardWriter(out, run_id, shard_of)
    skipped_parts: list[pa.Table] = []
    try:
        for norm in _normalized_batches(source, batch_rows):
            todo, skipped = split_finished(norm, done)
            writer.add(todo)
            if skipped.num_rows:
                skipped_parts.append(skipped)
    finally:
        writer.close()
    if skipped_parts:
        write_skipped(out, run_id, pa.concat_tables(skipped_parts), done)
    plan = {
        "run_id": run_id,
        "manifest": manifest_uri,
        "created": datetime.now(timezone.utc).isoformat(),
        "options": options.to_dict(),
        "shard_size": shard_size,
        "rows": source.rows,
        "pending": int(pending.sum()),
        "skipped": source.rows - int(pending.sum()),
        "sources": int(codes.max()) + 1 if len(codes) else 0,
        "passthrough": source.passthrough,
        "shards": shards,
        "seconds": {"validate": t_validate, "plan": time.perf_counter() - t0 - t_validate},
    }
    write_json(out, keys.plan_key(run_id), plan)
    logger.info(
        "planned run %s: %d edits (%d skipped) in %d shards",
        run_id, source.rows, plan["skipped"], len(shards),
    )  # fmt: skip
    return plan
