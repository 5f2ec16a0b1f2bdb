"""The CPU thread policy in Dask worker processes: an existing cluster's workers count themselves on
their host; editflow's own local cluster tells its workers how many they are."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows.bulk_edit import bulk_edit
from flows.runners import make_task_runner
from tasks.options import RunOptions
from tasks.worker import THREADS_ENV, WORKERS_ENV, cpu_budget

from .conftest import demo_rows, scene_png


@pytest.mark.slow
def test_workers_of_an_existing_cluster_take_the_cpus_of_their_host(
    prefect_server, flow_model, tmp_path, monkeypatch
):
    from distributed import LocalCluster

    monkeypatch.delenv(THREADS_ENV, raising=False)  # the policy, not the caller's override

    image = tmp_path / "scene.png"
    image.write_bytes(scene_png(2))
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.Table.from_pylist(demo_rows([str(image)] * 3, steps=2)[:2]), manifest)
    # a plain cluster (Dask's nanny starts its workers with OMP_NUM_THREADS=1, so torch would use 1)
    with LocalCluster(
        n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster:
        runner, gpu = make_task_runner("dask", dask_address=cluster.scheduler_address)
        summary = bulk_edit.with_options(task_runner=runner)(
            str(manifest),
            RunOptions(out=str(tmp_path / "out"), model=flow_model),
            gpu_resources=gpu,
        )
    assert summary["counts"]["succeeded"] == 2
    assert summary["threads_per_worker"] == [cpu_budget()]  # one worker on the host: all its CPUs


def test_editflows_local_cluster_tells_its_workers_their_count():
    runner, _ = make_task_runner("dask", dask_workers=3)
    env = runner.cluster_kwargs["env"]
    assert env[WORKERS_ENV] == "3"
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == str(max(1, cpu_budget() // 3))
    runner, _ = make_task_runner("dask", dask_workers=3, threads=5)
    assert runner.cluster_kwargs["env"]["OMP_NUM_THREADS"] == "5"
