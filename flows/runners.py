"""Task runners for the shard fan-out: a bounded thread pool (one worker per GPU, or one on CPU) or Dask."""

from __future__ import annotations

import logging
import os
import socket

logger = logging.getLogger(__name__)

# Seconds to wait for a Dask scheduler to accept a TCP connection before the run is refused.
CONNECT_TIMEOUT_S = 10.0


class ClusterUnreachable(ConnectionError):
    """The Dask scheduler given by --dask-address does not answer; the message names the address."""


def check_scheduler(address: str, *, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """``ClusterUnreachable`` unless a TCP connection to the Dask scheduler at `address` opens within
    `timeout` seconds (``tcp://`` and ``tls://`` addresses; others are left to Dask)."""
    from distributed.comm import parse_address, parse_host_port

    try:
        scheme, location = parse_address(address)
        host, port = parse_host_port(location)
    except ValueError as exc:
        raise ClusterUnreachable(
            f"--dask-address {address!r} is not a scheduler address ({exc}); expected tcp://HOST:PORT"
        ) from None
    if scheme not in ("tcp", "tls"):
        return
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else exc.strerror or str(exc)
        raise ClusterUnreachable(
            f"cannot reach the Dask scheduler at {address}: {reason}; start it "
            "(`dask scheduler`) or fix --dask-address"
        ) from None


# Seconds a local cluster's worker process may take to end once asked (its interpreter's exit, with torch,
# diffusers and a model loaded, takes several seconds on a busy machine) before Dask kills it. Dask's own
# 4 s (80% of Nanny.close's 5 s) made runs on a busy machine end with "Worker process still alive ...
# killing" warnings (seen at load ~5: a torch-loaded worker took 3-5 s to exit).
WORKER_EXIT_TIMEOUT_S = 60.0


def _patient_nanny():
    """A ``distributed.Nanny`` that waits up to :data:`WORKER_EXIT_TIMEOUT_S` for its worker process to
    end at close (a module attribute once made: distributed is imported only for Dask runs)."""
    cls = globals().get("PatientNanny")
    if cls is None:
        from distributed import Nanny

        class PatientNanny(Nanny):
            async def close(
                self, timeout: float = WORKER_EXIT_TIMEOUT_S, reason: str = "nanny-close"
            ):
                return await super().close(timeout=timeout, reason=reason)

        PatientNanny.__module__ = __name__
        cls = globals()["PatientNanny"] = PatientNanny
    return cls


def device_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def make_task_runner(
    kind: str = "local",
    *,
    dask_address: str | None = None,
    dask_workers: int = 2,
    max_workers: int | None = None,
    dask_gpu: bool = False,
    threads: int | None = None,
):
    """`local`: ThreadPoolTaskRunner bounded to one worker per GPU (one on CPU).
    `dask`: prefect-dask's DaskTaskRunner on `dask_address` (with `dask_gpu`, shard tasks ask for one
    "GPU" resource each), or on a new local cluster of `dask_workers` single-threaded worker processes, one
    per GPU when there are GPUs (each loads the model once, on its own GPU). Returns (runner, gpu_resources).

    CPU threads (:func:`tasks.worker.apply_thread_policy`): each worker takes the CPU budget divided by
    the workers on the machine, or `threads` when given; the local cluster's workers are told both."""
    if kind == "dask" and dask_address:
        check_scheduler(dask_address)  # a clear error now, not Dask's long timeout in the flow
    from tasks.worker import THREADS_ENV, WORKERS_ENV, set_local_workers, threads_per_worker

    if kind == "local":
        from prefect.task_runners import ThreadPoolTaskRunner

        workers = max_workers or max(1, device_count())
        set_local_workers(workers)
        return ThreadPoolTaskRunner(max_workers=workers), False
    if kind == "dask":
        from prefect_dask import DaskTaskRunner

        if dask_address:
            # annotate tasks with GPU resources only when asked: the cluster's workers must declare them
            # (dask worker --resources GPU=1), or annotated tasks never start
            return DaskTaskRunner(address=dask_address), dask_gpu
        gpus = device_count()
        kwargs = {
            "n_workers": gpus or dask_workers,
            "threads_per_worker": 1,
            "processes": True,
            "dashboard_address": None,
            "worker_class": _patient_nanny(),
        }
        if gpus:
            kwargs["resources"] = {"GPU": 1}
        n = threads_per_worker(
            kwargs["n_workers"],
            override=threads if threads is not None else os.environ.get(THREADS_ENV),
        )
        # Dask's nanny sets OMP_NUM_THREADS=1 in its workers; give them the policy's count from the start
        kwargs["env"] = {
            WORKERS_ENV: str(kwargs["n_workers"]),
            "OMP_NUM_THREADS": str(n),
            "MKL_NUM_THREADS": str(n),
        }
        return DaskTaskRunner(cluster_kwargs=kwargs), bool(gpus)
    raise ValueError(f"unknown runner {kind!r}; use 'local' or 'dask'")
