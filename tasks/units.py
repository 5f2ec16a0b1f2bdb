"""Prefect tasks: thin wrappers that take the run's `RunOptions` and ids, return small values, and own
the retry policy. Every storage read or write a flow needs is one of these tasks.

Retries: transient storage errors (throttling, 5xx, connection) are retried; anything else (a bad
manifest, out-of-memory, a code error, a run that does not exist) is not, since retrying it cannot help.
Caching: off (``NO_CACHE``): idempotency comes from the storage layout (finished edits are skipped).
"""

from __future__ import annotations

import logging
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from editing.prompts import prompt_budget
from storage.errors import is_transient
from storage.finished import merge_run_parts, record_shard
from storage.uri import open_store
from tasks import runs
from tasks.options import RestyleSpec, RunOptions
from tasks.planning import plan_run
from tasks.report import write_run_report
from tasks.results import write_review_manifest
from tasks.shard import run_shard

logger = logging.getLogger(__name__)


def retry_transient(task, task_run, state) -> bool:
    """Prefect retry condition: retry only transient storage errors."""
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - the failed state's exception is what we classify
        return is_transient(exc)
    return False


def _io_task(name: str, *, retry_delay_seconds: float = 2):
    """A task with the transient-error retry and no result caching."""
    return task(
        name=name,
        retries=2,
        retry_delay_seconds=retry_delay_seconds,
        retry_condition_fn=retry_transient,
        cache_policy=NO_CACHE,
        log_prints=False,
    )


@_io_task("plan")
def plan_task(
    manifest_uri: str, options: RunOptions, run_id: str, claim: str | None = None
) -> dict[str, Any]:
    """Load and validate the manifest, prompt lengths included (``ManifestError``: every problem,
    nothing written), claim the run id, plan, and write the plan under {out}/runs/{run_id}/; returns the plan (`claim`: a token that
    lets this task's retries take the run id they claimed)."""
    # prompt lengths: the model's tokenizer (no weights)
    budget = prompt_budget(options.tokenizer_ref)
    return plan_run(manifest_uri, options, run_id=run_id, claim=claim, budget=budget)


@_io_task("edit-shard", retry_delay_seconds=5)
def shard_task(options: RunOptions, run_id: str, shard_index: int) -> dict[str, Any]:
    """Edit one shard (model loaded once per worker process), record what it finished in the output's
    finished-edit index; return its counts and timings."""
    stats = run_shard(options, run_id, shard_index)
    out = open_store(options.out, s3_endpoint=options.s3_endpoint)
    stats["indexed"] = record_shard(out, run_id, shard_index)
    return stats


@_io_task("merge-finished-index")
def merge_index_task(options: RunOptions, run_id: str) -> int:
    """Merge the finished-index parts the run's shards wrote into one; returns how many there were."""
    return merge_run_parts(open_store(options.out, s3_endpoint=options.s3_endpoint), run_id)


@_io_task("read-plan")
def read_plan_task(options: RunOptions, run_id: str) -> dict[str, Any]:
    """The complete plan of `run_id` (``RunNotFound`` / ``RunIncomplete`` otherwise)."""
    return runs.read_run_plan(options, run_id)


@_io_task("shards-to-rerun")
def shards_to_rerun_task(options: RunOptions, run_id: str, plan: dict[str, Any]) -> dict[int, int]:
    """The shards of `plan` without results, or with failed rows: each with the edits it redoes."""
    return runs.shards_to_rerun(options, run_id, plan)


@_io_task("collect-results")
def collect_task(
    options: RunOptions,
    run_id: str,
    plan: dict[str, Any],
    stats: list[dict[str, Any]],
    failed_shards: list[str],
    wall: float,
) -> runs.Collected:
    """The run's results totalled into its summary (see :func:`tasks.runs.collect_results`)."""
    return runs.collect_results(options, run_id, plan, stats, failed_shards, wall)


@_io_task("report")
def report_task(options: RunOptions, run_id: str, summary: dict[str, Any]) -> dict[str, Any]:
    """Write the run's report.html and contact_sheet.png next to its results; return their URIs."""
    return write_run_report(options.out, run_id, summary=summary, s3_endpoint=options.s3_endpoint)


@_io_task("write-summary")
def write_summary_task(options: RunOptions, run_id: str, summary: dict[str, Any]) -> str:
    """Write the run's summary.json; returns its URI."""
    return runs.write_summary(options, run_id, summary)


@_io_task("restyle-manifest")
def restyle_manifest_task(catalog: str, spec: RestyleSpec, options: RunOptions, run_id: str) -> str:
    """Build restyle's manifest (catalog x styles) and write it under the run; returns its URI."""
    return runs.write_restyle_manifest(catalog, spec, options, run_id)


@_io_task("review-manifest")
def review_manifest_task(
    options: RunOptions, run_id: str, plan: dict[str, Any], settings: dict[str, Any]
) -> dict[str, Any]:
    """Write the manifest that re-edits the edits of `run_id` its QA gate flagged, with `settings`
    (:func:`tasks.results.write_review_manifest`); returns its run id, URI and edit count."""
    store = open_store(options.out, s3_endpoint=options.s3_endpoint)
    return write_review_manifest(store, run_id, plan, settings)


@_io_task("discard-restyle-manifest")
def discard_restyle_manifest_task(options: RunOptions, run_id: str) -> None:
    """Remove restyle's manifest of a run that never started (its manifest was invalid)."""
    runs.discard_restyle_manifest(options, run_id)
