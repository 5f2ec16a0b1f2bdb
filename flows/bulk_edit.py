"""The bulk-edit flows: validate -> plan -> fan out shards -> collect -> summarise; rerun; restyle.

Orchestration only: the work lives in :mod:`tasks` (plain functions wrapped as Prefect tasks). One task
per shard, never per image (Prefect's per-task overhead is large). The task runner is chosen by the
caller (:func:`flows.runners.make_task_runner`): a bounded thread pool by default, Dask for clusters.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from typing import Any

import pyarrow.compute as pc
from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from flows.runners import device_count
from manifests.build import DEFAULT_TEMPLATE, restyle_manifest
from storage import keys
from storage.base import NotFound
from storage.errors import describe_storage_error
from storage.uri import open_store
from storage.writer import read_json, read_parquet, write_json, write_parquet
from tasks.errors import RunExists, RunIncomplete, RunMismatch, RunNotFound
from tasks.options import RunOptions
from tasks.progress import RunWatch
from tasks.report import failures as report_failures
from tasks.report import report_markdown
from tasks.shard import read_run_results
from tasks.units import plan_task, report_task, shard_task

logger = logging.getLogger(__name__)

ProgressFn = Callable[[dict[str, Any]], None]
_progress: list[
    ProgressFn
] = []  # set by the CLI (a callable is no flow parameter: parameters are stored)


def set_progress_callback(fn: ProgressFn | None) -> None:
    """Call `fn` with each finished shard's stats (and once with the plan) during flows in this process."""
    _progress.clear()
    if fn is not None:
        _progress.append(fn)


def _notify(event: dict[str, Any]) -> None:
    for fn in _progress:
        fn(event)


def _fan_out(
    options: RunOptions, run_id: str, shards: Sequence[int], gpu_resources: bool
) -> tuple[list[dict], list[str]]:
    """Submit one task per shard; collect their stats as they finish."""
    opts = options.to_dict()
    plan = read_json(
        open_store(options.out, s3_endpoint=options.s3_endpoint), keys.plan_key(run_id)
    )
    edits_of = {
        sh["index"]: sh["edits"] for sh in plan.get("shards", []) if sh["index"] in set(shards)
    }
    watch = RunWatch(
        run_id,
        edits_of,
        _notify,
        task_runner=_current_task_runner(),
        artifact_key=f"progress-{run_id.lower()}"[:100],
    ).start()
    if gpu_resources:
        import dask

        with dask.annotate(resources={"GPU": 1}):
            futures = [shard_task.submit(opts, run_id, i) for i in shards]
    else:
        futures = [shard_task.submit(opts, run_id, i) for i in shards]
    index_of = {f.task_run_id: i for f, i in zip(futures, shards)}
    stats, failed = [], []
    for fut in as_completed(futures):
        try:
            s = fut.result()
            stats.append(s)
        except Exception as exc:  # noqa: BLE001 - a failed shard is recorded; `rerun` picks it up
            shard = index_of.get(fut.task_run_id)
            logger.error("shard %s failed: %s: %s", shard, type(exc).__name__, exc)
            failed.append(f"shard {shard}: {type(exc).__name__}: {exc}")
            s = {"shard": shard, "error": str(exc)}
        _notify(s)
        watch.shard_finished(s)
    watch.close()
    return stats, failed


def _current_task_runner():
    """The task runner of the running flow (progress listens to Dask workers through it)."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    return ctx.task_runner if ctx is not None else None


FAILED_ROWS_SHOWN = 10  # failed rows listed in the summary; the results table has them all


def _failed_rows(results, limit: int) -> list[dict[str, Any]]:
    """The first `limit` failed rows of a run's results (row, edit_id, error), in manifest order."""
    if not results.num_rows:
        return []
    failed = results.filter(pc.equal(results.column("status"), "failed")).select(
        ["row", "edit_id", "error"]
    )
    order = pc.sort_indices(failed, sort_keys=[("row", "ascending")])
    return failed.take(order).slice(0, limit).to_pylist()


def _summarise(
    options: RunOptions,
    run_id: str,
    plan: dict,
    stats: list[dict],
    failed_shards: list[str],
    wall: float,
) -> dict[str, Any]:
    out = open_store(options.out, s3_endpoint=options.s3_endpoint)
    results = read_run_results(options, run_id)
    counts = {s: 0 for s in ("succeeded", "failed", "skipped")}
    cache_hits = 0
    if results.num_rows:
        for s in counts:
            counts[s] = int(pc.sum(pc.equal(results.column("status"), s)).as_py() or 0)
        cache_hits = int(pc.sum(pc.fill_null(results.column("cache_hit"), False)).as_py() or 0)
    failed_rows = _failed_rows(results, FAILED_ROWS_SHOWN)
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
        "inversions_computed": sum(s.get("inversions_computed", 0) for s in stats),
        "inversion_cache_hits": sum(s.get("inversion_cache_hits", 0) for s in stats),
        "edit_cache_hits": cache_hits,
        "unet_evals": sum(s.get("unet_evals", 0.0) for s in stats),
        "failed_shards": failed_shards,
        "failed_rows": failed_rows,  # the first FAILED_ROWS_SHOWN failed rows: row, edit_id, error
        "threads_per_worker": sorted(
            {s["threads"] for s in stats if s.get("threads")}
        ),  # CPU policy in force
        "seconds": seconds,
        "results_uri": out.uri(keys.run_prefix(run_id) + "results/"),
    }
    summary.update(_report(options, run_id, summary))
    try:
        write_json(out, keys.summary_key(run_id), summary)
    except Exception as exc:  # noqa: BLE001 - e.g. a full disk: the caller still gets (and prints) the summary
        summary["summary_error"] = (
            describe_storage_error(exc)
            or f"could not write {out.uri(keys.summary_key(run_id))}: {type(exc).__name__}: {exc}"
        )
        logger.error("%s", summary["summary_error"])
    if results.num_rows:
        cols = [
            c
            for c in (
                "edit_id",
                "status",
                "output_uri",
                "error",
                "cache_hit",
                "unet_evals",
                "seconds",
            )
            if c in results.column_names
        ]
        create_table_artifact(
            results.select(cols).slice(0, 500).to_pylist(),
            key=f"results-{run_id.lower()}"[:100],
            description="first 500 results",
        )
    create_markdown_artifact(
        report_markdown(summary, summary, report_failures(results)),
        key=f"summary-{run_id.lower()}"[:100],
    )
    return summary


def _report(options: RunOptions, run_id: str, summary: dict[str, Any]) -> dict[str, Any]:
    """Write the run report (report.html, contact_sheet.png); a report that cannot be written never fails the run."""
    try:
        info = report_task(options.to_dict(), run_id, summary)
    except Exception as exc:  # noqa: BLE001 - the results are complete without it
        logger.warning("could not write the run report: %s: %s", type(exc).__name__, exc)
        return {"report_uri": None, "contact_sheet_uri": None}
    return {"report_uri": info["report_uri"], "contact_sheet_uri": info["contact_sheet_uri"]}


# Deployments (infra/prefect.yaml) use these defaults: one shard at a time per GPU (one on CPU).
_DEFAULT_RUNNER = ThreadPoolTaskRunner(max_workers=max(1, device_count()))


@flow(name="bulk-edit", log_prints=False, task_runner=_DEFAULT_RUNNER)
def bulk_edit(
    manifest: str,
    out: str,
    model: str = "",
    cache: str = "",
    shard_size: int = 64,
    s3_endpoint: str | None = None,
    run_id: str | None = None,
    image_format: str = "png",
    max_batch: int = 8,
    cache_features: bool = False,
    device: str | None = None,
    dtype: str | None = None,
    allow_pickle: bool = False,
    gpu_resources: bool = False,
    threads: int | None = None,
) -> dict[str, Any]:
    """Edit every row of `manifest` into `out`: validate, plan, one task per shard, summarise."""
    t0 = time.perf_counter()
    options = RunOptions(
        out=out, model=model, cache=cache, s3_endpoint=s3_endpoint, image_format=image_format,
        max_batch=max_batch, cache_features=cache_features, device=device, dtype=dtype, allow_pickle=allow_pickle,
        threads=threads,
    )  # fmt: skip
    run_id = run_id or keys.new_run_id()
    planned = plan_task(manifest, options.to_dict(), run_id, shard_size, claim=secrets.token_hex(8))
    plan = read_json(open_store(out, s3_endpoint=s3_endpoint), keys.plan_key(run_id))
    _notify({"planned": planned})
    stats, failed = _fan_out(options, run_id, range(planned["shards"]), gpu_resources)
    return _summarise(options, run_id, plan, stats, failed, time.perf_counter() - t0)


def shards_to_rerun(options: RunOptions, run_id: str, plan: dict) -> list[int]:
    """Shards without a results file, or whose results hold failed rows."""
    out = open_store(options.out, s3_endpoint=options.s3_endpoint)
    todo = []
    for shard in plan["shards"]:
        key = keys.shard_results_key(run_id, shard["index"])
        if not out.exists(key):
            todo.append(shard["index"])
            continue
        status = read_parquet(out, key).column("status")
        if pc.any(pc.equal(status, "failed")).as_py():
            todo.append(shard["index"])
    return todo


def refuse_existing_run(store, run_id: str) -> None:
    """``RunExists`` when `run_id` already has a plan under `store` (planning claims ids race-free too)."""
    key = keys.plan_key(run_id)
    if store.exists(key):
        raise RunExists(
            f"run {run_id} already exists under {store.uri()} ({store.uri(key)}); choose another --run-id, "
            f"or finish that run with `editflow rerun {run_id} --out {store.uri()}`"
        )


def read_plan(store, run_id: str) -> dict[str, Any]:
    """The complete plan of `run_id` in `store`; ``RunNotFound`` / ``RunIncomplete`` otherwise."""
    key = keys.plan_key(run_id)
    try:
        plan = read_json(store, key)
    except NotFound:
        raise RunNotFound(
            f"no run {run_id} under {store.uri()} (no {store.uri(key)}); the run ids are the folders of {store.uri('runs/')}"
        ) from None
    if not isinstance(plan, dict) or "shards" not in plan or "options" not in plan:
        raise RunIncomplete(
            f"run {run_id} under {store.uri()} was never planned completely ({store.uri(key)} is a placeholder); start a new run"
        )
    return plan


def trusted_options(
    plan: dict[str, Any],
    *,
    run_id: str,
    out: str,
    s3_endpoint: str | None,
    model: str,
    cache: str,
    allow_pickle: bool,
) -> RunOptions:
    """The rerun's options: the security-relevant ones (model, allow_pickle, cache, endpoint) from the
    caller, never from the stored plan (anyone who can write the output can change it); the model and
    cache the plan records must match them (``RunMismatch``). The rest (format, batch, ...) is the plan's."""
    recorded = dict(plan["options"])
    options = RunOptions.from_dict(
        {
            **recorded,
            "out": out,
            "s3_endpoint": s3_endpoint,
            "model": model,
            "cache": cache,
            "allow_pickle": allow_pickle,
        }
    )
    where = open_store(out, s3_endpoint=s3_endpoint).uri(keys.plan_key(run_id))
    rec_model = RunOptions(out=out, model=str(recorded.get("model") or "")).model_ref
    if rec_model != options.model_ref:
        raise RunMismatch(
            f"run {run_id}: {where} records model {rec_model!r} but this rerun uses {options.model_ref!r}; "
            f"pass --model {rec_model} if you trust that model (the model is never taken from the stored plan)"
        )
    rec_cache = str(recorded.get("cache") or "")
    if rec_cache != cache:
        flag = f"--cache {rec_cache}" if rec_cache else "no --cache"
        raise RunMismatch(
            f"run {run_id}: {where} records cache {rec_cache or '(default)'!r} but this rerun uses "
            f"{cache or '(default)'!r}; pass {flag} to use the same one"
        )
    return options


@flow(name="bulk-edit-rerun", log_prints=False, task_runner=_DEFAULT_RUNNER)
def rerun(
    run_id: str,
    out: str,
    s3_endpoint: str | None = None,
    gpu_resources: bool = False,
    threads: int | None = None,
    model: str = "",
    cache: str = "",
    allow_pickle: bool = False,
) -> dict[str, Any]:
    """Finish run `run_id`: redo only shards without results and rows that failed; keep the rest.
    `threads` (None: the recorded value, else the CPU policy) sets the workers' CPU threads.
    `model`, `cache` and `allow_pickle` come from the caller and must match what the plan records."""
    t0 = time.perf_counter()
    store = open_store(out, s3_endpoint=s3_endpoint)
    plan = read_plan(store, run_id)
    options = trusted_options(
        plan,
        run_id=run_id,
        out=out,
        s3_endpoint=s3_endpoint,
        model=model,
        cache=cache,
        allow_pickle=allow_pickle,
    )
    if threads is not None:
        options = dataclasses.replace(options, threads=threads)
    todo = shards_to_rerun(options, run_id, plan)
    _notify(
        {
            "planned": {
                "shards": len(todo),
                "pending": sum(s["edits"] for s in plan["shards"] if s["index"] in todo),
            }
        }
    )
    stats, failed = _fan_out(options, run_id, todo, gpu_resources)
    return _summarise(options, run_id, plan, stats, failed, time.perf_counter() - t0)


@flow(name="restyle", log_prints=False, task_runner=_DEFAULT_RUNNER)
def restyle(
    catalog: str,
    styles: list[str],
    out: str,
    template: str = DEFAULT_TEMPLATE,
    method: str = "pnp",
    image_column: str = "image_uri",
    caption_column: str = "caption",
    settings: str | None = None,
    model: str = "",
    cache: str = "",
    shard_size: int = 64,
    s3_endpoint: str | None = None,
    run_id: str | None = None,
    image_format: str = "png",
    max_batch: int = 8,
    cache_features: bool = False,
    device: str | None = None,
    dtype: str | None = None,
    allow_pickle: bool = False,
    gpu_resources: bool = False,
    threads: int | None = None,
) -> dict[str, Any]:
    """Catalog x styles -> a manifest (written under the run), then a bulk edit of it."""
    table = restyle_manifest(
        catalog, styles, template=template, method=method, image_column=image_column,
        caption_column=caption_column, s3_endpoint=s3_endpoint, settings=settings,
    )  # fmt: skip
    run_id = run_id or keys.new_run_id()
    store = open_store(out, s3_endpoint=s3_endpoint)
    refuse_existing_run(store, run_id)  # the plan claims the id; check before writing next to it
    key = keys.run_file_key(run_id, "manifest.parquet")
    write_parquet(store, key, table)
    return bulk_edit.fn(
        store.uri(key), out, model=model, cache=cache, shard_size=shard_size, s3_endpoint=s3_endpoint,
        run_id=run_id, image_format=image_format, max_batch=max_batch, cache_features=cache_features,
        device=device, dtype=dtype, allow_pickle=allow_pickle, gpu_resources=gpu_resources, threads=threads,
    )  # fmt: skip
