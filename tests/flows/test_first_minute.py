"""The first minute, continued (issue 20): a local Dask cluster that ends without killing its workers."""

from __future__ import annotations

from flows.runners import make_task_runner


def test_the_local_dask_cluster_lets_its_workers_end_on_their_own(tmp_path):
    """A worker whose exit takes over Dask's 4 s (a model and torch to tear down on a busy machine) is
    waited for, not killed with a "Worker process still alive ... killing" warning."""
    from distributed import Client, LocalCluster

    runner, _ = make_task_runner("dask", dask_workers=1)
    marker = tmp_path / "ended"

    def slow_exit() -> None:
        import atexit
        import time

        atexit.register(lambda: (time.sleep(4.5), marker.write_text("ended")))

    with LocalCluster(**runner.cluster_kwargs) as cluster, Client(cluster) as client:
        client.run(slow_exit)
    assert marker.read_text() == "ended"  # the worker process ran its exit to the end
