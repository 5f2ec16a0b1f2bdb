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


def get_model(model_ref: str, *, device: str | None = None, dtype: str | None = None, allow_pickle: bool = False) -> EditModel:
    """The process's model for these settings, loaded on first use."""
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


def model_lock() -> threading.Lock:
    """Held while a shard uses the model: one shard at a time per process and device."""
    return _DEVICE_LOCK


_DEVICE_LOCK = threading.Lock()
