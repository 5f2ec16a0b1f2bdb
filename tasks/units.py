"""Prefect tasks: thin wrappers that take URIs and ids, return small dicts, and own retry policy.

Retries: transient storage errors (throttling, 5xx, connection) are retried; anything else (a bad
manifest, out-of-memory, a code error) is not, since retrying it at the same batch size cannot help.
Caching: off (``NO_CACHE``): idempotency comes from the storage layout (finished edits are skipped).
"""

from __future__ import annotations

import logging
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from storage.errors import is_transient
from tasks.options import RunOptions
from tasks.planning import plan_run
from tasks.report import write_run_report
from tasks.shard import run_shard

logger = logging.getLogger(__name__)


def retry_transient(task, task_run, state) -> bool:
    """Prefect retry condition: retry only transient storage errors."""
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - the failed state's exception is what we classify
        return is_transient(exc)
    return False


@task(
    name="plan",
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=retry_transient,
    cache_policy=NO_CACHE,
    log_prints=False,
)
def plan_task(
    manifest_uri: str,
    options: dict[str, Any],
    run_id: str,
    shard_size: int,
    claim: str | None = None,
) -> dict[str, Any]:
    """Validate and plan the run; write the plan under {out}/runs/{run_id}/ (`claim`: a token that lets
    this task's retries take the run id they claimed)."""
    return plan_run(
        manifest_uri,
        RunOptions.from_dict(options),
        run_id=run_id,
        shard_size=shard_size,
        claim=claim,
    )


@task(
    name="edit-shard",
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=retry_transient,
    cache_policy=NO_CACHE,
    log_prints=False,
)
def shard_task(options: dict[str, Any], run_id: str, shard_index: int) -> dict[str, Any]:
    """Edit one shard (model loaded once per worker process); return its counts and timings."""
    return run_shard(RunOptions.from_dict(options), run_id, shard_index)


@task(
    name="report",
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=retry_transient,
    cache_policy=NO_CACHE,
    log_prints=False,
)
def report_task(options: dict[str, Any], run_id: str, summary: dict[str, Any]) -> dict[str, Any]:
    """Write the run's report.html and contact_sheet.png next to its results; return their URIs."""
    opts = RunOptions.from_dict(options)
    return write_run_report(opts.out, run_id, summary=summary, s3_endpoint=opts.s3_endpoint)
