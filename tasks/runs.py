"""A run's own records, read and written for the flows: its plan, which shards a rerun redoes, the
results collected into the summary, and restyle's manifest. Plain functions; :mod:`tasks.units` wraps
them as Prefect tasks with the transient-error retry, and the flows only call those.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from manifests import Problem
from manifests.build import restyle_manifest
from storage import keys
from storage.base import NotFound, ObjectStore
from storage.errors import describe_storage_error
from storage.finished import FinishedIndex, load_finished, still_stored
from storage.local import LocalStore
from storage.uri import open_store
from storage.writer import read_json, read_parquet, write_json, write_parquet
from tasks.errors import RunExists, RunIncomplete, RunMismatch, RunNotFound
from tasks.options import RestyleSpec, RunOptions
from tasks.report import failures as report_failures
from tasks.report import read_run_plan_json
from tasks.results import needs_review

logger = logging.getLogger(__name__)

FAILED_ROWS_SHOWN = 10  # failed rows listed in the summary; the results table has them all
PREVIEW_ROWS = 500  # results rows in the flow's table artifact
PREVIEW_COLUMNS = (
    "edit_id",
    "status",
    "output_uri",
    "error",
    "reason",
    "qa_text",
    "qa",
    "cache_hit",
    "unet_evals",
    "seconds",
)
# a failed row's error when its output could not be stored (tasks.shard.write_one's phrase)
WRITE_FAILED = "writing output failed"
# a failure of the store itself: full, read-only, denied, I/O (an OSError's "[Errno N]"), or S3 unreachable
# or refusing (a symlink leaving --out is refused as EACCES); editflow's own ValueErrors only fail the row
_STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO)
_ERRNOS = "|".join(str(e) for e in _STORAGE_ERRNOS)
_STORAGE_ERROR = re.compile(
    rf"\[Errno ({_ERRNOS})\]|\b(EndpointConnectionError|ConnectTimeoutError|ReadTimeoutError|"
    r"ConnectionClosedError|ClientError)\b"
)


def _store(options: RunOptions) -> ObjectStore:
    return open_store(options.out, s3_endpoint=options.s3_endpoint)


def refuse_existing_run(store: ObjectStore, run_id: str, *, s3_endpoint: str | None = None) -> None:
    """``RunExists`` when `run_id` already has a plan under `store` (planning claims ids race-free too);
    its hint is the full rerun command, with `s3_endpoint` when one was given."""
    key = keys.plan_key(run_id)
    if store.exists(key):
        raise RunExists.of(run_id, store.uri(), store.uri(key), s3_endpoint)


def read_plan(store: ObjectStore, run_id: str) -> dict[str, Any]:
    """The complete plan of `run_id` in `store`, checked; ``RunNotFound`` / ``RunIncomplete`` /
    ``RunDamaged`` otherwise."""
    key = keys.plan_key(run_id)
    try:
        plan = read_run_plan_json(store, run_id)
    except NotFound:
        raise RunNotFound(
            f"no run {run_id} under {store.uri()} (no {store.uri(key)}); the run ids are the folders of {store.uri('runs/')}"
        ) from None
    if not isinstance(plan, dict) or "shards" not in plan or "options" not in plan:
        raise RunIncomplete(
            f"run {run_id} under {store.uri()} was never planned completely ({store.uri(key)} is a placeholder); start a new run"
        )
    return plan


def read_run_plan(options: RunOptions, run_id: str) -> dict[str, Any]:
    """:func:`read_plan` under the output root of `options`."""
    return read_plan(_store(options), run_id)


def trusted_options(plan: dict[str, Any], caller: RunOptions, *, run_id: str) -> RunOptions:
    """A rerun's options: the security-relevant ones (model, allow_pickle, cache, endpoint) and the output
    root from the caller, never from the stored plan (anyone who can write the output can change it); the
    model and cache the plan records must match them (``RunMismatch``). The CPU threads are the caller's
    unless None (then the recorded ones); the rest (format, batch, ...) is the plan's."""
    recorded = dict(plan["options"])
    # a run planned before --output-size wrote its edits at the model's size: its rerun does the same
    recorded.setdefault("output_size", "model")
    options = RunOptions.from_dict(
        {
            **recorded,
            "out": caller.out,
            "s3_endpoint": caller.s3_endpoint,
            "model": caller.model,
            "cache": caller.cache,
            "allow_pickle": caller.allow_pickle,
        }
    )
    if caller.threads is not None:
        options = dataclasses.replace(options, threads=caller.threads)
    where = _store(caller).uri(keys.plan_key(run_id))
    rec_model = RunOptions(out=caller.out, model=str(recorded.get("model") or "")).model_ref
    if rec_model != options.model_ref:
        raise RunMismatch(
            f"run {run_id}: {where} records model {rec_model!r} but this rerun uses {options.model_ref!r}; "
            f"pass --model {rec_model} if you trust that model (the model is never taken from the stored plan)"
        )
    rec_cache = str(recorded.get("cache") or "")
    if rec_cache != caller.cache:
        flag = f"--cache {rec_cache}" if rec_cache else "no --cache"
        raise RunMismatch(
            f"run {run_id}: {where} records cache {rec_cache or '(default)'!r} but this rerun uses "
            f"{caller.cache or '(default)'!r}; pass {flag} to use the same one"
        )
    return options


# Shard results read at once by shards_to_rerun (object-store reads wait on latency).
RERUN_READ_THREADS = 16


def shards_to_rerun(options: RunOptions, run_id: str, plan: dict[str, Any]) -> dict[int, int]:
    """Shards to run again, each with the edits it will redo (its others stand): those without a
    results file (all their edits), with failed rows, or with a finished edit whose image or sidecar is
    gone (deleted since). Such an edit's row is recorded as failed in its
    shard's results ("is gone"), so that the shard redoes it and keeps every other finished edit.

    Requests: one GET per shard, the root's finished-edit index (:func:`storage.finished.load_finished`),
    and two HEADs per finished edit or, when that takes fewer requests, one listing of ``assets/``."""
    return edits_to_redo(_store(options), run_id, plan)


def edits_to_redo(out: ObjectStore, run_id: str, plan: dict[str, Any]) -> dict[int, int]:
    """:func:`shards_to_rerun` under the output root `out`."""
    edits = {s["index"]: int(s["edits"]) for s in plan["shards"]}
    todo: dict[int, int] = {}
    index: list[
        FinishedIndex
    ] = []  # the root's finished-edit index, read at the first finished edit
    for shard, results in _shard_results(out, run_id, list(edits)):
        if results is None:
            todo[shard] = edits[shard]
            continue
        finished = pc.and_(
            pc.is_in(results.column("status"), pa.array(["succeeded", "skipped"])),
            pc.is_valid(results.column("output_uri")),
        ).to_numpy(zero_copy_only=False)
        gone = np.zeros(len(finished), bool)
        if finished.any():
            index = index or [load_finished(out)]
            gone[finished] = ~still_stored(index[0], results.filter(pa.array(finished)))
        if gone.any():
            write_parquet(out, keys.shard_results_key(run_id, shard), _mark_gone(results, gone))
            logger.info("run %s shard %d: %d finished edits lost their output; redoing them",
                        run_id, shard, int(gone.sum()))  # fmt: skip
        if gone.any() or pc.any(pc.equal(results.column("status"), "failed")).as_py():
            todo[shard] = max(0, edits[shard] - int((finished & ~gone).sum()))
    return todo


def _shard_results(
    out: ObjectStore, run_id: str, shards: list[int]
) -> Iterator[tuple[int, pa.Table | None]]:
    """(shard, its results table or None when it has none), in order, read a window at a time."""

    def read(shard: int) -> pa.Table | None:
        try:
            return read_parquet(out, keys.shard_results_key(run_id, shard))
        except NotFound:
            return None

    window = 4 * RERUN_READ_THREADS  # tables held at once
    with ThreadPoolExecutor(max_workers=RERUN_READ_THREADS) as pool:
        for start in range(0, len(shards), window):
            some = shards[start : start + window]
            yield from zip(some, pool.map(read, some), strict=True)


def _mark_gone(results: pa.Table, gone: np.ndarray) -> pa.Table:
    """`results` with the rows `gone` recorded as failed: their output is no longer stored."""
    mask = pa.array(gone)
    error = pc.binary_join_element_wise(
        "row ", results.column("row").cast(pa.string()), ": the output ",
        results.column("output_uri"), " (or its sidecar) is gone; redone by a rerun", "",
    )  # fmt: skip
    replaced = {
        "status": pc.if_else(mask, "failed", results.column("status")),
        "error": pc.if_else(mask, error, results.column("error")),
        "output_uri": pc.if_else(mask, pa.scalar(None, pa.string()), results.column("output_uri")),
        "metadata_uri": pc.if_else(mask, pa.scalar(None, pa.string()), results.column("metadata_uri")),
    }  # fmt: skip
    for name, column in replaced.items():
        i = results.schema.get_field_index(name)
        results = results.set_column(i, results.schema.field(i), column)
    return results


@dataclass(frozen=True)
class Collected:
    """A finished run's results, collected: the summary (without the report's URIs yet), the first
    results rows (for the flow's table artifact) and every failed row (for its markdown artifact)."""

    summary: dict[str, Any]
    preview: list[dict[str, Any]]
    failures: list[dict[str, Any]]


def _failed_rows(results: pa.Table, limit: int) -> list[dict[str, Any]]:
    """The first `limit` failed rows of a run's results (row, edit_id, error), in manifest order."""
    if not results.num_rows:
        return []
    failed = results.filter(pc.equal(results.column("status"), "failed")).select(
        ["row", "edit_id", "error"]
    )
    order = pc.sort_indices(failed, sort_keys=[("row", "ascending")])
    return failed.take(order).slice(0, limit).to_pylist()


def storage_failures(results: pa.Table, failed_shards: list[str]) -> dict[str, Any] | None:
    """Edits whose output the store refused to take and shards that failed on the store (full, read-only,
    denied, unreachable): ``{"edits": n, "shards": m, "error": the first such error}``, or None. A run
    with any is a storage failure (exit 3): fixing the manifest's rows would not help."""
    errors: list[str] = []
    edits = 0
    if results.num_rows and "error" in results.column_names:
        failed = results.filter(pc.equal(results.column("status"), "failed")).column("error")
        hits = [
            e for e in failed.to_pylist() if e and WRITE_FAILED in e and _STORAGE_ERROR.search(e)
        ]
        edits, errors = len(hits), hits[:1]
    shards = [s for s in failed_shards if _STORAGE_ERROR.search(s)]
    if not edits and not shards:
        return None
    return {"edits": edits, "shards": len(shards), "error": (errors or shards)[0]}


def _add_up(stats: list[dict[str, Any]], key: str) -> Any:
    return sum(s.get(key, 0) for s in stats)


def collect_results(
    options: RunOptions,
    run_id: str,
    plan: dict[str, Any],
    stats: list[dict[str, Any]],
    failed_shards: list[str],
    wall: float,
) -> Collected:
    """Read the run's results and total them with the shards' stats into the run summary."""
    # the engine's modules (torch) only once a run is collected: the CLI's checks import this module
    from tasks.shard import read_run_results

    results = read_run_results(options, run_id)
    counts = {s: 0 for s in ("succeeded", "failed", "skipped")}
    cache_hits = 0
    if results.num_rows:
        for s in counts:
            counts[s] = int(pc.sum(pc.equal(results.column("status"), s)).as_py() or 0)
        cache_hits = int(pc.sum(pc.fill_null(results.column("cache_hit"), False)).as_py() or 0)
    unplanned = plan["rows"] - results.num_rows  # rows of shards that failed as a whole
    counts["failed"] += max(0, unplanned)
    seconds: dict[str, float] = {"wall": wall, **plan.get("seconds", {})}
    for s in stats:
        for k, v in s.get("seconds", {}).items():
            seconds[f"shards_{k}"] = seconds.get(f"shards_{k}", 0.0) + v
    summary = {
        "run_id": run_id,
        "out": options.out,
        "rows": plan["rows"],
        "counts": counts,
        "inversions_computed": _add_up(stats, "inversions_computed"),
        "inversion_cache_hits": _add_up(stats, "inversion_cache_hits"),
        "edit_cache_hits": cache_hits,
        "unet_evals": sum(s.get("unet_evals", 0.0) for s in stats),
        # succeeded edits the QA gate flagged (editflow show and the report list them, worst first)
        "needs_review": len(needs_review(results)),
        "qa": {"gate": options.qa, "unet_evals": _add_up(stats, "qa_unet_evals")},
        "failed_shards": failed_shards,
        # the first FAILED_ROWS_SHOWN failed rows: row, edit_id, error
        "failed_rows": _failed_rows(results, FAILED_ROWS_SHOWN),
        # edits and shards that failed because storage did (full, read-only, unreachable); None if none
        "storage_failures": storage_failures(results, failed_shards),
        # the CPU policy in force
        "threads_per_worker": sorted({s["threads"] for s in stats if s.get("threads")}),
        "seconds": seconds,
        "results_uri": _store(options).uri(keys.run_results_prefix(run_id)),
    }
    summary = with_attempts(summary, read_previous_summary(options, run_id), plan)
    preview = []
    if results.num_rows:
        cols = [c for c in PREVIEW_COLUMNS if c in results.column_names]
        preview = results.select(cols).slice(0, PREVIEW_ROWS).to_pylist()
    return Collected(summary=summary, preview=preview, failures=report_failures(results))


def read_previous_summary(options: RunOptions, run_id: str) -> dict[str, Any] | None:
    """The summary an earlier attempt of `run_id` wrote, or None (first attempt, an interrupted one that
    wrote none, or one that cannot be read: it is replaced)."""
    return read_summary(_store(options), run_id)


def read_summary(out: ObjectStore, run_id: str) -> dict[str, Any] | None:
    """:func:`read_previous_summary` from the output root `out`."""
    try:
        previous = read_json(out, keys.summary_key(run_id))
    except NotFound:
        return None
    except (ValueError, RecursionError) as exc:
        logger.warning(
            "run %s: earlier summary unreadable (%s); its attempts are not kept", run_id, exc
        )
        return None
    return previous if isinstance(previous, dict) else None


def _earlier_attempts(previous: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The attempts an earlier summary records (one made before attempts were kept counts as one)."""
    if previous is None:
        return []
    if isinstance(previous.get("attempts"), list):
        return [dict(a) for a in previous["attempts"] if isinstance(a, dict)]
    counts = previous.get("counts") or {}
    wall = float((previous.get("seconds") or {}).get("wall", 0.0))
    return [_attempt(1, "run", wall, counts.get("succeeded", 0), counts.get("failed", 0), None,
                     previous.get("inversions_computed", 0), previous.get("unet_evals", 0.0))]  # fmt: skip


def _attempt(
    number: int, kind: str, wall: float, succeeded: int, failed: int, edits: int | None,
    inversions: int, unet_evals: float, finished: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    """One attempt's record: its wall time, the edits it tried and what became of them, its rate."""
    return {
        "attempt": number,
        "kind": kind,  # "run" (the first) or "rerun"
        "finished": finished,  # UTC, ISO 8601; None when not recorded
        "seconds": wall,
        "edits": edits,  # edits it tried (pending, or failed earlier); None when not recorded
        "succeeded": succeeded,
        "failed": failed,  # its edits that failed (what a next rerun retries)
        "inversions_computed": inversions,
        "unet_evals": unet_evals,
        "edits_per_hour": succeeded / wall * 3600 if wall > 0 else None,
    }


def with_attempts(
    summary: dict[str, Any], previous: dict[str, Any] | None, plan: dict[str, Any]
) -> dict[str, Any]:
    """`summary` of this attempt made the run's: an ``attempts`` list (the earlier summary's, then this
    one), and the time, inversions and UNet evaluations totalled over every attempt (the counts are the
    run's already: they come from all results), so the run's rate is over all attempts' time."""
    import datetime as dt

    earlier = _earlier_attempts(previous)
    counts = summary["counts"]
    before = (previous or {}).get("counts") or {}
    kept = int(before.get("succeeded", 0)) + int(before.get("skipped", 0))
    tried = int(plan.get("pending", plan["rows"])) if previous is None else plan["rows"] - kept
    secs = dict(summary["seconds"])
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    this = _attempt(
        len(earlier) + 1, "rerun" if earlier else "run", float(secs.get("wall", 0.0)),
        counts["succeeded"] - int(before.get("succeeded", 0)), counts["failed"], tried,
        summary["inversions_computed"], summary["unet_evals"], now,
    )  # fmt: skip
    prev_secs = (previous or {}).get("seconds") or {}
    for k, v in prev_secs.items():  # the plan's own seconds are the same in every attempt
        if k == "wall" or k.startswith("shards_"):
            secs[k] = secs.get(k, 0.0) + float(v)
    prev = previous or {}
    return {
        **summary,
        "inversions_computed": summary["inversions_computed"] + prev.get("inversions_computed", 0),
        "unet_evals": summary["unet_evals"] + prev.get("unet_evals", 0.0),
        "seconds": secs,
        "attempts": [*earlier, this],
    }


def write_summary(options: RunOptions, run_id: str, summary: dict[str, Any]) -> str:
    """Write ``summary.json`` of the run; returns its URI."""
    out = _store(options)
    write_json(out, keys.summary_key(run_id), summary)
    return out.uri(keys.summary_key(run_id))


def summary_error(options: RunOptions, run_id: str, exc: BaseException) -> str:
    """The line that says the summary could not be written (e.g. a full disk)."""
    where = _store(options).uri(keys.summary_key(run_id))
    return describe_storage_error(exc) or f"could not write {where}: {type(exc).__name__}: {exc}"


def write_restyle_manifest(
    catalog: str, spec: RestyleSpec, options: RunOptions, run_id: str
) -> str:
    """Catalog x styles -> the run's manifest, written under the run (``RunExists`` if the run id is
    taken: the plan claims it, so check before writing next to it); returns its URI."""
    table = restyle_manifest(
        catalog, spec.styles, template=spec.template, method=spec.method,
        image_column=spec.image_column, caption_column=spec.caption_column,
        s3_endpoint=options.s3_endpoint, settings=spec.settings,
    )  # fmt: skip
    store = _store(options)
    refuse_existing_run(store, run_id)
    key = keys.run_manifest_key(run_id)
    write_parquet(store, key, table)
    return store.uri(key)


def discard_restyle_manifest(options: RunOptions, run_id: str) -> None:
    """Remove the manifest :func:`write_restyle_manifest` wrote (its run never started), and on a local
    output root the run's folders it leaves empty: an invalid manifest leaves no run behind."""
    store = _store(options)
    store.delete(keys.run_manifest_key(run_id))
    if isinstance(store, LocalStore):
        run_folder = Path(store.uri(keys.run_prefix(run_id)))
        for folder in (run_folder, run_folder.parent):
            try:
                folder.rmdir()  # only an empty folder
            except OSError:
                break


def restyle_problems(problems: list[Problem], spec: RestyleSpec) -> list[Problem]:
    """`problems` of a restyle manifest, each row's reason naming its catalog row and style."""
    annotated = []
    for p in problems:
        if p.row is not None:
            catalog_row, style = spec.style_of(p.row)
            p = dataclasses.replace(
                p, reason=f"{p.reason} (catalog row {catalog_row}, style {style!r})"
            )
        annotated.append(p)
    return annotated
