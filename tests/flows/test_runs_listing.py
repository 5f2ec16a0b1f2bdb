"""`editflow runs` and `latest`: the runs under an output root, newest first, found without Prefect."""

from __future__ import annotations

import argparse

import pytest

from flows import cli
from flows.cli import main
from storage import keys
from storage.uri import open_store
from storage.writer import write_json


def _plan(run_id: str, created: str, rows: int = 3) -> dict:
    return {"run_id": run_id, "created": created, "rows": rows, "shards": [], "options": {}}


@pytest.fixture
def three_runs(tmp_path):
    """An output root with a finished run, one with failed edits, an interrupted one and a placeholder."""
    out = open_store(str(tmp_path / "out"))
    write_json(out, keys.plan_key("a-old"), _plan("a-old", "2026-12-01T10:00:00+00:00"))
    write_json(out, keys.summary_key("a-old"), {"counts": {"succeeded": 3, "failed": 0, "skipped": 0}, "seconds": {"wall": 12.5}})  # fmt: skip
    write_json(out, keys.plan_key("z-mid"), _plan("z-mid", "2026-12-02T10:00:00+00:00"))
    write_json(out, keys.summary_key("z-mid"), {"counts": {"succeeded": 1, "failed": 2, "skipped": 0}, "seconds": {"wall": 3.0}})  # fmt: skip
    write_json(out, keys.plan_key("m-new"), _plan("m-new", "2026-12-03T10:00:00+00:00"))
    write_json(out, keys.plan_key("p-planning"), {"run_id": "p-planning", "state": "planning", "created": "2026-11-30T00:00:00+00:00"})  # fmt: skip
    return tmp_path / "out"


def test_runs_lists_newest_first_with_status_counts_and_time(three_runs, capsys):
    assert main(["runs", "--out", str(three_runs)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["RUN", "START", "(UTC)"]
    assert [line.split()[0] for line in lines[1:]] == ["m-new", "z-mid", "a-old", "p-planning"]
    assert lines[1].split()[3] == "interrupted"
    assert lines[2].split()[3:] == ["failed", "edits", "1", "2", "0", "3", "3.0s"]
    assert lines[3].split()[3:] == ["finished", "3", "0", "0", "3", "12.5s"]
    assert "planning" in lines[4]
    assert main(["runs", "--out", str(three_runs), "--limit", "1"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2


def test_latest_names_the_newest_run_wherever_a_run_id_goes(three_runs, capsys):
    assert main(["show", "latest", "--out", str(three_runs)]) == 0  # interrupted, no failed edits
    assert "run m-new (interrupted" in capsys.readouterr().out
    assert main(["show", f"{three_runs}/runs/latest"]) == 0
    assert "run m-new (interrupted" in capsys.readouterr().out


def test_latest_of_an_empty_root_and_runs_of_one(tmp_path, capsys):
    assert main(["runs", "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == f"no runs under {tmp_path}"
    assert main(["show", "latest", "--out", str(tmp_path)]) == 2
    assert "no runs under" in capsys.readouterr().err
    assert main(["rerun", "latest", "--out", str(tmp_path)]) == 2
    assert "no runs under" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # the word is taken: not a new run's id
        main(["run", "m.parquet", "--out", str(tmp_path), "--run-id", "latest"])
    assert exc.value.code == 2


def test_hints_carry_the_real_run_id_and_the_s3_endpoint():
    args = argparse.Namespace(
        command="run", run_id="r7", out="s3://bkt/out", s3_endpoint="http://h:9000"
    )
    assert (
        cli._command(args, "rerun", "r7")
        == "editflow rerun r7 --out s3://bkt/out --s3-endpoint http://h:9000"
    )
    cli._ARGS[:] = [args]
    try:
        assert (
            "`editflow rerun r7 --out s3://bkt/out --s3-endpoint http://h:9000` finishes run r7"
            in (cli._interrupted_hint())
        )
    finally:
        cli._ARGS.clear()
    local = argparse.Namespace(command="run", run_id="r8", out="/data/my out", s3_endpoint=None)
    assert cli._command(local, "show", "r8") == "editflow show r8 --out '/data/my out'"
    summary = {"run_id": "r8", "out": "/data/my out", "counts": {"succeeded": 0, "failed": 1, "skipped": 0},
               "rows": 1, "inversions_computed": 0, "inversion_cache_hits": 0, "unet_evals": 0,
               "seconds": {"wall": 1.0}, "results_uri": "/r", "report_uri": None, "failed_rows": []}  # fmt: skip
    args.run_id = "r8"
    assert "`editflow rerun r8 --out '/data/my out' --s3-endpoint http://h:9000` retries them" in (
        _printed(lambda: cli._print_summary(summary, args))
    )


def _printed(fn) -> str:
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        fn()
    return buf.getvalue()


@pytest.mark.parametrize("where", ["local", "s3"])
def test_runs_are_found_by_listing_the_run_folders_not_every_key(
    where, tmp_path, s3_client, s3_bucket
):
    """A delimiter listing of runs/ (one level): a run's many result keys are never listed; a folder
    without a plan.json is no run."""
    from storage.local import LocalStore
    from storage.s3 import S3Store
    from tasks.listing import list_runs

    if where == "s3":
        bucket, prefix = s3_bucket[len("s3://") :].split("/", 1)
        store = S3Store(bucket, prefix, s3_client, page_size=2)
    else:
        store = LocalStore(tmp_path / "out")
    for run_id, created in (
        ("r-a", "2026-12-01T00:00:00+00:00"),
        ("r-b", "2026-12-02T00:00:00+00:00"),
    ):
        write_json(store, keys.plan_key(run_id), _plan(run_id, created))
        for part in range(6):  # results parts: 3 pages each at 2 keys a page
            store.put(f"runs/{run_id}/results/part-{part}.parquet", b"x")
    store.put("runs/no-plan/results/part-0.parquet", b"x")
    store.put("runs/loose.json", b"{}")
    listed: list[int] = []
    if where == "s3":  # count the keys the listing requests return (a real moto server)

        def count(parsed, **_):
            listed.append(len(parsed.get("Contents", [])))

        s3_client.meta.events.register("after-call.s3.ListObjectsV2", count)
    try:
        assert list(store.folders("runs/")) == ["no-plan", "r-a", "r-b"]
        assert [e["run_id"] for e in list_runs(store)] == ["r-b", "r-a"]
    finally:
        if where == "s3":
            s3_client.meta.events.unregister("after-call.s3.ListObjectsV2", count)
    if where == "s3":
        # two listings of two pages each; the only key returned is runs/loose.json (once a listing)
        assert len(listed) == 4 and sum(listed) == 2
