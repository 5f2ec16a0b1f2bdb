"""One loaded model per worker process: shard tasks in the same process (thread or Dask worker) reuse it."""

from __future__ import annotations

import logging
import threading

import torch

from editing.model import EditModel, load_model

logger = logging.getLogger(__name__)

_MODELS: dict[tuple, EditModel] = {}
_LOCK = threading.Lock()
LOADS = {"count": 0}  # how many times this process loaded a model (tests and reports read it)


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


def get_model(model_ref: str, *, device: str | None = None, dtype: str | None = None, allow_pickle: bool = False) -> EditModel:
    """The process's model for these settings (and this worker's GPU), loaded on first use."""
    device = device or worker_device()
    key = (model_ref, device, dtype, allow_pickle)
    with _LOCK:
        model = _MODELS.get(key)
        if model is None:
            _quiet_loading()
            torch_dtype = getattr(torch, dtype) if dtype else None
            model = load_model(model_ref, device=device, dtype=torch_dtype, allow_pickle=allow_pickle)
            _MODELS[key] = model
            LOADS["count"] += 1
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
    """Held while a shard uses `model`'s device: one shard at a time per device in a process."""
    with _LOCK:
        return _DEVICE_LOCKS.setdefault(str(model.device), threading.Lock())
