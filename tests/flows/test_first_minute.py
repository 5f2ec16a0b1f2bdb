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


def test_a_rerun_s_progress_counts_only_the_edits_it_redoes():
    """A rerun's shard of 8 edits with 1 failed: the shard counts its 7 standing edits as done at its
    start; the run's progress shows 0/1, then 1/1 (it showed 7/8 at once before)."""
    from tasks.progress import RunWatch, ShardProgress

    seen: list[dict] = []
    watch = RunWatch("rerun-1", {0: 1}, seen.append, standing={0: 7}).start()
    shard = ShardProgress("rerun-1", 0, 8)
    shard.set(7)  # the standing edits, published as the shard starts
    shard.add(1)  # the redone edit
    watch.shard_finished({"shard": 0, "edits": 8, "failed": 0})
    watch.close()
    counts = [(e["progress"]["done"], e["progress"]["total"]) for e in seen if "progress" in e]
    assert sorted(set(counts)) == [(0, 1), (1, 1)] and counts[-1] == (1, 1)


def test_a_taken_run_id_s_hint_is_the_full_command_with_the_endpoint(s3_server, s3_bucket, capsys):
    from flows.cli import main
    from storage import keys
    from storage.uri import open_store
    from storage.writer import write_json

    out = f"{s3_bucket}/out"
    write_json(open_store(out, s3_endpoint=s3_server), keys.plan_key("taken"), {"run_id": "taken"})
    argv = ["run", "manifests/examples/demo.parquet", "--out", out, "--s3-endpoint", s3_server]
    assert main([*argv, "--run-id", "taken"]) == 2
    err = capsys.readouterr().err
    assert "run taken already exists" in err
    assert f"`editflow rerun taken --out {out}/ --s3-endpoint {s3_server}`" in err


def test_a_run_id_taken_while_planning_s_hint_has_the_endpoint_too(s3_server, s3_bucket):
    """The race the CLI's early check cannot see: another run claims the id first; planning's claim
    refuses it with the same full command as the early check."""
    import pytest

    from storage import keys
    from storage.uri import open_store
    from storage.writer import write_json
    from tasks.errors import RunExists
    from tasks.planning import claim_run

    out = open_store(f"{s3_bucket}/claim", s3_endpoint=s3_server)
    write_json(out, keys.plan_key("raced"), {"run_id": "raced", "state": "planning", "claim": "a"})
    claim_run(out, "raced", "a", s3_server)  # a retry of the same planning takes it again
    with pytest.raises(RunExists) as err:
        claim_run(out, "raced", "b", s3_server)
    assert f"`editflow rerun raced --out {out.uri()} --s3-endpoint {s3_server}`" in str(err.value)
