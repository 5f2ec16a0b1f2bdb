"""The bulk-edit flows: plan (validating the manifest) -> fan out shards -> collect -> summarise; rerun;
restyle (a manifest from a catalog, then bulk edit as a subflow).

Orchestration only: every read and write is a task of :mod:`tasks.units` (with the transient-error
retry); the flows wire them, notify progress and publish artifacts. One task per shard, never per image
(Prefect's per-task overhead is large), a bounded window of shards in flight. The task runner is chosen by the caller
(:func:`flows.runners.make_task_runner`): a bounded thread pool by default, Dask for clusters.
Every flow takes the run's options as one :class:`~tasks.options.RunOptions` (a dict is coerced to one:
deployments store parameters as JSON).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import queue
import secrets
import time
from collections.abc import Callable, Sequence
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.context import FlowRunContext
from prefect.task_runners import ThreadPoolTaskRunner

from flows.runners import device_count
from manifests import ManifestError
from storage import keys
from tasks.options import RestyleSpec, RunOptions
from tasks.progress import RunWatch
from tasks.report import report_markdown
from tasks.runs import restyle_problems, summary_error, trusted_options
from tasks.units import (
    collect_task,
    discard_restyle_manifest_task,
    merge_index_task,
    plan_task,
    read_plan_task,
    report_task,
    restyle_manifest_task,
    review_manifest_task,
    shard_task,
    shards_to_rerun_task,
    write_summary_task,
)

logger = logging.getLogger(__name__)

ProgressFn = Callable[[dict[str, Any]], None]
# set by the CLI (a callable is no flow parameter: parameters are stored)
_progress: list[ProgressFn] = []


def set_progress_callback(fn: ProgressFn | None) -> None:
    """Call `fn` with each finished shard's stats (and once with the plan) during flows in this process."""
    _progress.clear()
    if fn is not None:
        _progress.append(fn)


def _notify(event: dict[str, Any]) -> None:
    for fn in _progress:
        fn(event)


def _current_task_runner():
    """The task runner of the running flow (progress listens to Dask workers through it)."""
    ctx = FlowRunContext.get()
    return ctx.task_runner if ctx is not None else None


# Shard tasks in flight per worker: one running and one queued, so that no worker waits on orchestration
# while a 100k-shard run holds only a few futures and sends Prefect a few task runs at a time.
IN_FLIGHT_PER_WORKER = 2


def fan_out_window(task_runner) -> int:
    """Shard tasks kept in flight: :data:`IN_FLIGHT_PER_WORKER` per worker of `task_runner` (thread
    pool: its threads; Dask: the cluster's workers when the run starts, or their GPU resources)."""
    workers = 1
    client = getattr(task_runner, "_client", None)
    if client is not None:  # prefect-dask's DaskTaskRunner, started
        info = client.scheduler_info().get("workers", {})
        gpus = sum(w.get("resources", {}).get("GPU", 0) for w in info.values())
        workers = int(gpus) or len(info) or 1
    elif isinstance(getattr(task_runner, "_max_workers", None), int):  # ThreadPoolTaskRunner
        workers = task_runner._max_workers
    return max(1, workers) * IN_FLIGHT_PER_WORKER


def _submit_shard(options: RunOptions, run_id: str, shard: int, gpu_resources: bool):
    if not gpu_resources:
        return shard_task.submit(options, run_id, shard)
    import dask

    with dask.annotate(resources={"GPU": 1}):
        return shard_task.submit(options, run_id, shard)


def _fan_out(
    options: RunOptions, run_id: str, shards: Sequence[dict], gpu_resources: bool
) -> tuple[list[dict], list[str]]:
    """Run one task per shard (`shards`: the plan's entries), a bounded window of them in flight (see
    :func:`fan_out_window`): the next is submitted as one finishes; collect their stats."""
    runner = _current_task_runner()
    # a rerun's shard redoes only its `pending` edits: progress counts those, not the ones that stand
    watch = RunWatch(
        run_id,
        {sh["index"]: sh.get("pending", sh["edits"]) for sh in shards},
        _notify,
        standing={sh["index"]: sh["edits"] - sh["pending"] for sh in shards if "pending" in sh},
        task_runner=runner,
        artifact_key=f"progress-{run_id.lower()}"[:100],
    ).start()
    todo = iter([sh["index"] for sh in shards])
    finished: queue.SimpleQueue = queue.SimpleQueue()
    shard_of: dict[Any, int] = {}

    def submit(n: int) -> int:
        count = 0
        for index in itertools.islice(todo, n):
            future = _submit_shard(options, run_id, index, gpu_resources)
            shard_of[future.task_run_id] = index
            future.add_done_callback(finished.put)
            count += 1
        return count

    stats, failed = [], []
    in_flight = submit(fan_out_window(runner))
    while in_flight:
        fut = finished.get()
        shard = shard_of.pop(fut.task_run_id, None)
        try:
            s = fut.result()
            stats.append(s)
        except Exception as exc:  # noqa: BLE001 - a failed shard is recorded; `rerun` picks it up
            logger.error("shard %s failed: %s: %s", shard, type(exc).__name__, exc)
            failed.append(f"shard {shard}: {type(exc).__name__}: {exc}")
            s = {"shard": shard, "error": str(exc)}
        _notify(s)
        watch.shard_finished(s)
        in_flight += submit(1) - 1
    watch.close()
    return stats, failed


def _report(options: RunOptions, run_id: str, summary: dict[str, Any]) -> dict[str, Any]:
    """Write the run report (report.html, contact_sheet.png); a report that cannot be written never fails the run."""
    try:
        info = report_task(options, run_id, summary)
    except Exception as exc:  # noqa: BLE001 - the results are complete without it
        logger.warning("could not write the run report: %s: %s", type(exc).__name__, exc)
        return {"report_uri": None, "contact_sheet_uri": None}
    return {"report_uri": info["report_uri"], "contact_sheet_uri": info["contact_sheet_uri"]}


def _merge_index(options: RunOptions, run_id: str) -> None:
    """One finished-index part for the run instead of one per shard (planning reads every part)."""
    try:
        merge_index_task(options, run_id)
    except Exception as exc:  # noqa: BLE001 - the parts stay; the next planning reads or merges them
        logger.warning("could not merge the finished-edit index: %s: %s", type(exc).__name__, exc)


def _write_summary(options: RunOptions, run_id: str, summary: dict[str, Any]) -> None:
    try:
        write_summary_task(options, run_id, summary)
    except Exception as exc:  # noqa: BLE001 - e.g. a full disk: the caller still gets (and prints) the summary
        summary["summary_error"] = summary_error(options, run_id, exc)
        logger.error("%s", summary["summary_error"])


def _publish(
    run_id: str, summary: dict[str, Any], preview: list[dict], failures: list[dict]
) -> None:
    """The run's Prefect artifacts: the first results rows and the summary as markdown."""
    if preview:
        create_table_artifact(
            preview, key=f"results-{run_id.lower()}"[:100], description="first 500 results"
        )
    create_markdown_artifact(
        report_markdown(summary, summary, failures), key=f"summary-{run_id.lower()}"[:100]
    )


def _edit_and_summarise(
    options: RunOptions,
    run_id: str,
    plan: dict[str, Any],
    shards: Sequence[dict],
    gpu_resources: bool,
    t0: float,
) -> dict[str, Any]:
    """Fan out `shards` (entries of `plan`), then collect, report and write the run's summary."""
    stats, failed = _fan_out(options, run_id, shards, gpu_resources)
    _merge_index(options, run_id)
    collected = collect_task(options, run_id, plan, stats, failed, time.perf_counter() - t0)
    summary = collected.summary
    _notify({"stage": {"name": "report"}})
    summary.update(_report(options, run_id, summary))
    _write_summary(options, run_id, summary)
    _publish(run_id, summary, collected.preview, collected.failures)
    return summary


# Deployments (infra/prefect.yaml) use these defaults: one shard at a time per GPU (one on CPU).
_DEFAULT_RUNNER = ThreadPoolTaskRunner(max_workers=max(1, device_count()))


@flow(name="bulk-edit", log_prints=False, task_runner=_DEFAULT_RUNNER)
def bulk_edit(
    manifest: str, options: RunOptions, run_id: str | None = None, gpu_resources: bool = False
) -> dict[str, Any]:
    """Edit every row of `manifest` into ``options.out``: plan (``ManifestError`` for an invalid
    manifest, before anything is written), one task per shard, summarise. `gpu_resources`: each shard
    task asks the Dask cluster for one "GPU" resource."""
    t0 = time.perf_counter()
    run_id = run_id or keys.new_run_id()
    plan = plan_task(manifest, options, run_id, claim=secrets.token_hex(8))
    planned = {k: plan[k] for k in ("run_id", "rows", "pending", "skipped", "sources", "seconds")}
    _notify({"planned": {**planned, "shards": len(plan["shards"])}})
    return _edit_and_summarise(options, run_id, plan, plan["shards"], gpu_resources, t0)


@flow(name="bulk-edit-rerun", log_prints=False, task_runner=_DEFAULT_RUNNER)
def rerun(run_id: str, options: RunOptions, gpu_resources: bool = False) -> dict[str, Any]:
    """Finish run `run_id`: redo only shards without results and rows that failed; keep the rest.
    From `options`, the output root, endpoint, model, cache and allow_pickle are taken (the model and
    cache must match what the plan records) and the CPU threads unless None; the rest is the plan's."""
    t0 = time.perf_counter()
    plan = read_plan_task(options, run_id)
    options = trusted_options(plan, options, run_id=run_id)
    todo = shards_to_rerun_task(options, run_id, plan)  # shard -> the edits it redoes
    shards = [{**s, "pending": todo[s["index"]]} for s in plan["shards"] if s["index"] in todo]
    _notify({"planned": {"shards": len(shards), "pending": sum(todo.values())}})
    return _edit_and_summarise(options, run_id, plan, shards, gpu_resources, t0)


@flow(name="bulk-edit-review", log_prints=False, task_runner=_DEFAULT_RUNNER)
def rerun_needs_review(
    run_id: str, settings: dict[str, Any], options: RunOptions, gpu_resources: bool = False
) -> dict[str, Any]:
    """Re-edit the edits of run `run_id` that its QA gate flagged, with `settings` over each edit's own,
    as a new run under the same output root (new edit ids: the original's plus a settings hash; the
    originals kept): :func:`bulk_edit` of :func:`tasks.results.review_manifest` as a subflow, or, when
    the same command planned it before, :func:`rerun` of that run. Options as for :func:`rerun`."""
    plan = read_plan_task(options, run_id)
    options = trusted_options(plan, options, run_id=run_id)
    review = review_manifest_task(options, run_id, plan, settings)
    runner = _current_task_runner() or _DEFAULT_RUNNER
    if review["planned"]:
        return rerun.with_options(task_runner=runner)(review["run_id"], options, gpu_resources)
    if not review["edits"]:
        raise ValueError(
            f"run {run_id}: no edit needs review (QA gate {options.qa}); nothing to rerun"
        )
    edit = bulk_edit.with_options(task_runner=runner)
    try:
        return edit(
            review["manifest"], options, run_id=review["run_id"], gpu_resources=gpu_resources
        )
    except ManifestError as exc:  # e.g. a setting a flagged edit's method does not take
        discard_restyle_manifest_task(options, review["run_id"])  # nothing is left
        originals = review["originals"]
        raise ManifestError([
            dataclasses.replace(p, reason=f"{p.reason} (edit {originals[p.row]} of run {run_id})")
            if p.row is not None and p.row < len(originals) else p
            for p in exc.problems
        ]) from None  # fmt: skip


@flow(name="restyle", log_prints=False, task_runner=_DEFAULT_RUNNER)
def restyle(
    catalog: str,
    spec: RestyleSpec,
    options: RunOptions,
    run_id: str | None = None,
    gpu_resources: bool = False,
) -> dict[str, Any]:
    """Catalog x styles -> a manifest (written under the run), then :func:`bulk_edit` of it as a subflow
    on this flow's task runner. An invalid manifest: ``ManifestError`` whose rows name their catalog row
    and style, and the manifest removed again."""
    run_id = run_id or keys.new_run_id()
    manifest = restyle_manifest_task(catalog, spec, options, run_id)
    edit = bulk_edit.with_options(task_runner=_current_task_runner() or _DEFAULT_RUNNER)
    try:
        return edit(manifest, options, run_id=run_id, gpu_resources=gpu_resources)
    except ManifestError as exc:
        discard_restyle_manifest_task(options, run_id)
        raise ManifestError(restyle_problems(exc.problems, spec)) from None


@flow(name="bulk-edit-on-dask", log_prints=False)
def bulk_edit_on_dask(
    manifest: str,
    options: RunOptions,
    dask_address: str,
    run_id: str | None = None,
    gpu_resources: bool = True,
) -> dict[str, Any]:
    """:func:`bulk_edit` with its shards on the existing Dask cluster at `dask_address` (for
    deployments: a deployment stores parameters, not a task runner). `gpu_resources`: each shard asks
    for one "GPU" resource (workers started with ``--resources GPU=1``)."""
    from flows.runners import make_task_runner

    runner, gpu = make_task_runner("dask", dask_address=dask_address, dask_gpu=gpu_resources)
    edit = bulk_edit.with_options(task_runner=runner)
    return edit(manifest, options, run_id=run_id, gpu_resources=gpu)
