"""The CPU thread policy: CPUs over workers, overrides, cgroup quotas, and that a shard applies it."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

from tasks import worker
from tasks.worker import (
    THREADS_ENV,
    WORKERS_ENV,
    apply_thread_policy,
    cpu_budget,
    parse_threads,
    threads_per_worker,
)


@pytest.fixture
def policy_state(monkeypatch) -> Iterator[None]:
    """Each test decides the policy afresh; torch's thread count and the child-process env come back."""
    before = torch.get_num_threads()
    for name in (THREADS_ENV, WORKERS_ENV):
        monkeypatch.delenv(name, raising=False)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(name, os.environ.get(name, "1"))  # restored by monkeypatch afterwards
    monkeypatch.setattr(worker, "_USER_OMP", None)  # as if started without OMP_NUM_THREADS
    worker.reset_thread_policy()
    worker.set_local_workers(None)
    yield
    worker.reset_thread_policy()
    worker.set_local_workers(None)
    torch.set_num_threads(before)


@pytest.mark.parametrize(
    ("workers", "budget", "override", "expected"),
    [
        (1, 2, None, 2),  # one worker takes the machine
        (2, 2, None, 1),  # the benchmark's case: 2 workers on 2 cores
        (3, 16, None, 5),  # rounds down
        (4, 2, None, 1),  # never below 1
        (2, 2, 3, 3),  # --threads wins
        (2, 2, "4", 4),  # EDITFLOW_THREADS text
        (2, 8, "", 4),  # an empty variable means unset
    ],
)
def test_threads_per_worker(workers, budget, override, expected):
    assert threads_per_worker(workers, budget=budget, override=override) == expected


@pytest.mark.parametrize("bad", ["0", "-2", "two", 0, "1.5"])
def test_bad_thread_counts_are_refused_with_the_value(bad):
    with pytest.raises(ValueError, match="positive integer"):
        parse_threads(bad)


def test_bad_worker_count_is_refused():
    with pytest.raises(ValueError, match="workers"):
        threads_per_worker(0, budget=4)


def _cgroup(tmp_path, v2: str | None = None, v1: tuple[str, str] | None = None):
    root = tmp_path / "cg"
    root.mkdir(parents=True)
    if v2 is not None:
        (root / "cpu.max").write_text(v2 + "\n")
    if v1 is not None:
        (root / "cpu").mkdir()
        (root / "cpu" / "cpu.cfs_quota_us").write_text(v1[0] + "\n")
        (root / "cpu" / "cpu.cfs_period_us").write_text(v1[1] + "\n")
    return root


def test_cpu_budget_is_the_affinity_capped_by_a_cgroup_quota(tmp_path):
    affinity = len(os.sched_getaffinity(0))
    assert cpu_budget(cgroup_root=_cgroup(tmp_path / "none")) == affinity  # nothing readable
    assert cpu_budget(cgroup_root=_cgroup(tmp_path / "max", v2="max 100000")) == affinity
    assert (
        cpu_budget(cgroup_root=_cgroup(tmp_path / "v2", v2="50000 100000")) == 1
    )  # half a CPU -> 1
    assert cpu_budget(cgroup_root=_cgroup(tmp_path / "v1", v1=("-1", "100000"))) == affinity
    assert cpu_budget(cgroup_root=_cgroup(tmp_path / "v1q", v1=("100000", "100000"))) == 1
    big = _cgroup(tmp_path / "big", v2=f"{(affinity + 4) * 100000} 100000")
    assert cpu_budget(cgroup_root=big) == affinity  # a quota above the affinity does not add CPUs


def test_apply_sets_torch_and_child_env_once(policy_state, monkeypatch):
    monkeypatch.setattr(worker, "cpu_budget", lambda **_: 6)
    worker.set_local_workers(2)
    assert apply_thread_policy() == 3
    assert torch.get_num_threads() == 3
    assert os.environ["OMP_NUM_THREADS"] == "3" and os.environ["MKL_NUM_THREADS"] == "3"
    worker.set_local_workers(3)  # settled for the process: not decided again per shard
    assert apply_thread_policy() == 3


def test_override_order_cli_then_env_then_policy(policy_state, monkeypatch):
    monkeypatch.setattr(worker, "cpu_budget", lambda **_: 4)
    monkeypatch.setenv(THREADS_ENV, "2")
    assert apply_thread_policy() == 2 and torch.get_num_threads() == 2
    assert (
        apply_thread_policy(3) == 3 and torch.get_num_threads() == 3
    )  # --threads beats the variable
    monkeypatch.delenv(THREADS_ENV)
    worker.reset_thread_policy()
    monkeypatch.setenv(WORKERS_ENV, "4")  # what editflow tells its local Dask workers
    assert apply_thread_policy() == 1


def test_an_omp_num_threads_the_user_started_with_is_honoured(policy_state, monkeypatch):
    monkeypatch.setattr(worker, "cpu_budget", lambda **_: 8)
    monkeypatch.setattr(worker, "_USER_OMP", "1")
    assert apply_thread_policy() == 1 and torch.get_num_threads() == 1
    monkeypatch.setenv(THREADS_ENV, "3")  # EDITFLOW_THREADS beats it
    assert apply_thread_policy() == 3
    monkeypatch.delenv(THREADS_ENV)
    worker.reset_thread_policy()
    monkeypatch.setattr(worker, "_USER_OMP", "4,2")  # OpenMP's nested form: the outer count
    assert apply_thread_policy() == 4
    worker.reset_thread_policy()
    monkeypatch.setattr(worker, "_USER_OMP", "junk")  # not a count: the policy decides
    assert apply_thread_policy() == 8


def test_a_shard_applies_the_policy(policy_state, monkeypatch, tmp_path):
    """run_shard sets the worker's threads before its model runs, and reports the count."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from refmodel.toy import TINY, build_toy_pipeline
    from tasks.options import RunOptions
    from tasks.planning import plan_run
    from tasks.shard import run_shard
    from tests.flows.conftest import demo_rows, scene_png

    model = build_toy_pipeline(tmp_path / "model", TINY, seed=1)
    image = tmp_path / "scene.png"
    image.write_bytes(scene_png(0))
    rows = demo_rows([str(image)] * 3, steps=2)[:2]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "m.parquet")
    monkeypatch.setattr(worker, "cpu_budget", lambda **_: 6)
    worker.set_local_workers(3)  # as make_task_runner("local", max_workers=3) records
    opts = RunOptions(out=str(tmp_path / "out"), model=str(model))
    plan_run(str(tmp_path / "m.parquet"), opts, run_id="t1", shard_size=64)
    torch.set_num_threads(1)
    stats = run_shard(opts, "t1", 0)
    assert stats["succeeded"] == 2
    assert stats["threads"] == 2 and torch.get_num_threads() == 2  # 6 CPUs / 3 workers
    assert os.environ["OMP_NUM_THREADS"] == "2"
