"""One loaded model per worker process: shard tasks in the same process (thread or Dask worker) reuse it,
one at a time per device (:func:`model_lock`), with their storage work around it (:class:`Behind`,
:func:`read_ahead`).

Also the CPU thread policy: each worker process gives torch (and OpenMP/MKL in its child processes)
its share of the machine's CPUs, so that several workers on one machine do not spin OpenMP threads
against each other (see README: Performance and threads).
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import torch

from editing.model import EditModel, compile_unet, load_model

logger = logging.getLogger(__name__)

_MODELS: dict[tuple, EditModel] = {}
_LOCK = threading.Lock()


THREADS_ENV = "EDITFLOW_THREADS"  # intra-op threads per worker process; overrides the policy
WORKERS_ENV = "EDITFLOW_WORKERS_PER_MACHINE"  # shard workers sharing this machine's CPUs (set for local Dask workers)
_CHILD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
# OMP_NUM_THREADS as this process was started, before the policy sets it for child processes
_USER_OMP = os.environ.get("OMP_NUM_THREADS")
_POLICY: dict[str, int | None] = {"threads": None, "workers": None, "local_workers": None}


def cpu_budget(*, cgroup_root: str | Path = "/sys/fs/cgroup") -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup CPU quota when one is set
    (cgroup v2 ``cpu.max`` or v1 ``cpu/cpu.cfs_quota_us``); ``os.cpu_count()`` where neither is readable."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = _cgroup_quota(Path(cgroup_root))
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return max(1, cpus)


def _cgroup_quota(root: Path) -> float | None:
    """The cgroup CPU quota in CPUs (e.g. 1.5), or None when unlimited or unreadable."""
    try:
        text = (root / "cpu.max").read_text().split()
        if len(text) == 2 and text[0] != "max":
            return int(text[0]) / int(text[1])
        return None
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def parse_threads(value: int | str | None, *, what: str = THREADS_ENV) -> int | None:
    """A thread count from the CLI or the environment: a positive integer, or None when unset/empty."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a positive integer, got {value!r}") from None
    if n < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return n


def threads_per_worker(
    workers: int, *, budget: int | None = None, override: int | str | None = None
) -> int:
    """The policy: `override` (``--threads`` / ``EDITFLOW_THREADS``) when given, else the CPU budget
    divided by the shard workers on this machine (at least 1)."""
    n = parse_threads(override)
    if n is not None:
        return n
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    return max(1, (budget if budget is not None else cpu_budget()) // workers)


def set_local_workers(n: int | None) -> None:
    """Record how many shard worker threads the local runner of this process uses (None: the default)."""
    _POLICY["local_workers"] = n


def workers_on_machine() -> int:
    """Shard workers sharing this machine's CPUs, seen from this worker process: ``EDITFLOW_WORKERS_PER_MACHINE``
    when set (editflow sets it for the workers of its local Dask cluster); in a Dask worker, the workers the
    scheduler knows on this host; else the local runner's threads (one per GPU, one on CPU)."""
    env = parse_threads(os.environ.get(WORKERS_ENV), what=WORKERS_ENV)
    if env is not None:
        return env
    dask_count = _dask_workers_on_host()
    if dask_count is not None:
        return dask_count
    if _POLICY["local_workers"]:
        return int(_POLICY["local_workers"])
    return max(1, torch.cuda.device_count() if torch.cuda.is_available() else 0)


def _dask_workers_on_host() -> int | None:
    """In a Dask worker: how many workers the scheduler lists on this worker's host (None outside Dask)."""
    try:
        from distributed import get_client, get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        return None
    try:
        host = worker.address.rsplit(":", 1)[0]
        info = get_client().scheduler_info(n_workers=-1)
        count = sum(1 for addr in info.get("workers", {}) if addr.rsplit(":", 1)[0] == host)
        return max(1, count)
    except Exception as exc:  # noqa: BLE001 - the count is a hint; fall back to one worker
        logger.warning(
            "could not count the Dask workers on this host (%s: %s); assuming 1",
            type(exc).__name__,
            exc,
        )
        return 1


def _user_omp_threads() -> int | None:
    """The OMP_NUM_THREADS the user started this process with; None inside a Dask worker (Dask's nanny
    sets it to 1 for every worker, which is no choice of the user's) or when unset or not a count."""
    if not _USER_OMP:
        return None
    distributed = sys.modules.get("distributed")  # a Dask worker has imported it
    if distributed is not None:
        try:
            distributed.get_worker()
            return None
        except ValueError:
            pass
    try:
        n = int(_USER_OMP.split(",")[0])
    except ValueError:
        return None
    return n if n >= 1 else None


def apply_thread_policy(threads: int | None = None) -> int:
    """Set this process's intra-op threads once (``torch.set_num_threads``, and ``OMP_NUM_THREADS`` /
    ``MKL_NUM_THREADS`` for child processes): `threads` (``--threads``), else ``EDITFLOW_THREADS``, else
    an ``OMP_NUM_THREADS`` the process was started with (not in Dask workers), else the CPU budget over
    the workers on this machine. Returns the count in force."""
    override = threads if threads is not None else os.environ.get(THREADS_ENV)
    if parse_threads(override) is None:
        override = _user_omp_threads()
    with _LOCK:
        if _POLICY["threads"] is not None and override is None and _POLICY["workers"] is not None:
            return int(_POLICY["threads"])  # the policy is settled for this process
        workers = workers_on_machine() if parse_threads(override) is None else None
        n = threads_per_worker(workers or 1, override=override)
        if n != _POLICY["threads"] or torch.get_num_threads() != n:
            torch.set_num_threads(n)
            for name in _CHILD_ENV:
                os.environ[name] = str(n)
            logger.info(
                "CPU threads per worker: %d (%s)",
                n,
                "override" if workers is None else f"{cpu_budget()} CPUs / {workers} workers",
            )
        _POLICY["threads"], _POLICY["workers"] = n, workers
        return n


def reset_thread_policy() -> None:
    """Forget the applied policy (tests), so the next :func:`apply_thread_policy` decides again."""
    with _LOCK:
        _POLICY["threads"] = _POLICY["workers"] = None


_THREAD = threading.local()
_NEXT_GPU = {"i": 0}


def worker_device() -> str | None:
    """This worker's GPU when a machine has several: a Dask worker named N takes cuda:N mod count, a
    thread of the local runner the next one round-robin; None (the default device) otherwise."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count <= 1:
        return None
    try:
        from distributed import get_worker

        name = get_worker().name
        if isinstance(name, int):
            return f"cuda:{name % count}"
    except (ImportError, ValueError):
        pass
    if not hasattr(_THREAD, "device"):
        with _LOCK:
            _THREAD.device = f"cuda:{_NEXT_GPU['i'] % count}"
            _NEXT_GPU["i"] += 1
    return _THREAD.device


def get_model(
    model_ref: str,
    *,
    device: str | None = None,
    dtype: str | None = None,
    allow_pickle: bool = False,
    revision: str | None = None,
    download: bool = False,
    loras: tuple[str, ...] = (),
    config: str | None = None,
    compile: str = "off",
) -> EditModel:
    """The process's model for these settings (and this worker's GPU), loaded on first use; a hub id at
    the run's pinned `revision` (fetched only with `download`), with the run's LoRA adapters; its UNet
    ``torch.compile``d once here when `compile` is not "off" (:func:`editing.model.compile_unet`), so
    every shard of the process reuses the compiled graphs."""
    device = device or worker_device()
    key = (
        model_ref,
        device,
        dtype,
        allow_pickle,
        revision,
        download,
        tuple(loras),
        config,
        compile,
    )
    with _LOCK:
        model = _MODELS.get(key)
        if model is None:
            _quiet_loading()
            torch_dtype = getattr(torch, dtype) if dtype else None
            model = load_model(
                model_ref, device=device, dtype=torch_dtype, allow_pickle=allow_pickle,
                revision=revision, local_files_only=not download, loras=loras, config=config,
            )  # fmt: skip
            compile_unet(model, compile)
            _MODELS[key] = model
            logger.info("worker loaded model %s", model_ref)
        return model


def _quiet_loading() -> None:
    """No per-component progress bars or import notes from diffusers/transformers inside workers."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    tlog.set_verbosity_error()


_DEVICE_LOCKS: dict[str, threading.Lock] = {}


def model_lock(model: EditModel) -> threading.Lock:
    """Held while a shard runs `model` (one shard at a time per device in a process), for model work only:
    inversion, editing, decoding, judging and the tokenizer (not thread-safe); a shard's storage requests
    and encodes run outside it, so that the device does not wait on them."""
    with _LOCK:
        return _DEVICE_LOCKS.setdefault(str(model.device), threading.Lock())


class Behind:
    """Work done behind the caller in `threads` threads, bounded: at most `depth` jobs wait or run at once,
    and :meth:`submit` blocks while that many do (back-pressure, so a slow store holds back the producer
    instead of filling memory). :meth:`drain` waits for every job and raises the first exception one
    raised; leaving the ``with`` block waits for the jobs still running (their exceptions are logged when
    the block itself ends in an exception, so none is lost)."""

    def __init__(self, threads: int, depth: int, *, name: str = "behind") -> None:
        if threads < 1 or depth < 1:
            raise ValueError(f"threads and depth must be >= 1, got {threads} and {depth}")
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name)
        self._room = threading.Semaphore(depth)
        self._jobs: list[Future] = []
        self.waited = 0.0  # seconds submit blocked on a full queue

    def submit(self, fn: Callable[..., Any], /, *args: Any) -> Future:
        """Run ``fn(*args)`` in a thread, once the queue has room; its future."""
        t0 = time.perf_counter()
        self._room.acquire()
        self.waited += time.perf_counter() - t0
        try:
            job = self._pool.submit(fn, *args)
        except BaseException:
            self._room.release()
            raise
        job.add_done_callback(lambda _: self._room.release())
        self._jobs.append(job)
        return job

    def drain(self) -> None:
        """Wait for every job submitted so far; the first exception a job raised, raised here."""
        wait(self._jobs)
        for job in self._jobs:
            job.result()

    def __enter__(self) -> Behind:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._pool.shutdown(wait=True)
        if exc is not None:
            for job in self._jobs:
                if job.exception() is not None:
                    logger.error("a background job failed too: %r", job.exception())


def read_ahead(
    pool: ThreadPoolExecutor, fn: Callable[[Any], Any], items: Iterable[Any], depth: int
) -> Iterator[Future]:
    """``fn(item)`` of each item run in `pool`, at most `depth` items ahead of the one the caller takes;
    their futures in order (a future's ``result()`` raises what `fn` raised)."""
    items = iter(items)
    pending = deque(pool.submit(fn, item) for item in itertools.islice(items, depth))
    while pending:
        job = pending.popleft()
        for item in itertools.islice(items, 1):
            pending.append(pool.submit(fn, item))
        yield job
