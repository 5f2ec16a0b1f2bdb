"""Task runners for the shard fan-out: a bounded thread pool (one worker per GPU, or one on CPU) or Dask."""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def device_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def make_task_runner(kind: str = "local", *, dask_address: str | None = None, dask_workers: int = 2, max_workers: int | None = None):
    """`local`: ThreadPoolTaskRunner bounded to one worker per GPU (one on CPU: torch uses every core).
    `dask`: prefect-dask's DaskTaskRunner on `dask_address`, or on a new local cluster of `dask_workers`
    single-threaded worker processes (each loads the model once). Returns (runner, gpu_resources)."""
    if kind == "local":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=max_workers or max(1, device_count())), False
    if kind == "dask":
        from prefect_dask import DaskTaskRunner

        if dask_address:
            # GPU annotations only where the cluster's workers declare GPU resources (dask-worker --resources GPU=1)
            return DaskTaskRunner(address=dask_address), False
        gpus = device_count()
        kwargs = {"n_workers": gpus or dask_workers, "threads_per_worker": 1, "processes": True, "dashboard_address": None}
        if gpus:
            kwargs["resources"] = {"GPU": 1}
        return DaskTaskRunner(cluster_kwargs=kwargs), bool(gpus)
    raise ValueError(f"unknown runner {kind!r}; use 'local' or 'dask'")
