"""The worker's per-process model: shard tasks in one process share one load per settings."""

from __future__ import annotations


def test_a_worker_process_loads_each_model_once(model_dir, model):
    from tasks.worker import get_model

    assert get_model(model_dir, device="cpu", dtype="float32") is model
    assert get_model(model_dir, device="cpu", dtype="float64") is not model  # other settings
