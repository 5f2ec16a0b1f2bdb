"""Reruns as attempts: the summary keeps each attempt's time, counts and rate, the run's rate is over all
attempts; an earlier attempt's failures.csv goes when nothing fails now; skipped rows carry a reason."""

from __future__ import annotations

from storage import keys, open_store
from storage.finished import record_shard
from storage.writer import read_json, read_parquet
from tasks.planning import plan_run
from tasks.report import attempt_lines, attempts_html, format_overview, run_overview, write_report
from tasks.runs import collect_results, with_attempts, write_summary
from tasks.shard import run_shard

from .conftest import png_bytes, row


def _summary(succeeded: int, failed: int, wall: float, *, skipped: int = 0) -> dict:
    """A collected summary of one attempt as collect_results makes it (before attempts are added)."""
    return {"run_id": "r", "rows": 8, "counts": {"succeeded": succeeded, "failed": failed, "skipped": skipped},
            "inversions_computed": 4, "inversion_cache_hits": 0, "unet_evals": 100.0,
            "seconds": {"wall": wall, "plan": 1.0, "shards_edit": wall / 2}}  # fmt: skip


def test_a_rerun_is_an_attempt_and_the_rate_is_over_all_attempts():
    plan = {"rows": 8, "pending": 8}
    first = with_attempts(_summary(7, 1, 100.0), None, plan)
    [a1] = first["attempts"]
    assert (a1["attempt"], a1["kind"], a1["edits"], a1["succeeded"], a1["failed"]) == (
        1,
        "run",
        8,
        7,
        1,
    )
    assert a1["edits_per_hour"] == 7 / 100.0 * 3600
    second = with_attempts(_summary(8, 0, 12.0), first, plan)
    a2 = second["attempts"][1]
    assert (a2["attempt"], a2["kind"], a2["edits"], a2["succeeded"], a2["failed"]) == (
        2,
        "rerun",
        1,
        1,
        0,
    )
    assert second["attempts"][0] == a1
    # the run's totals: time, stage seconds, inversions and UNet evaluations over both attempts
    assert second["seconds"] == {"wall": 112.0, "plan": 1.0, "shards_edit": 56.0}
    assert (second["inversions_computed"], second["unet_evals"]) == (8, 200.0)
    lines = attempt_lines(second)
    assert lines[0].startswith("attempt 1 (run, finished ") and lines[0].endswith(
        "8 tried: 7 succeeded, 1 failed; 100.0s; 252 edits/hour"
    )
    assert lines[1].endswith("1 tried: 1 succeeded, 0 failed; 12.0s; 300 edits/hour")
    assert (
        lines[2] == "all 2 attempt(s): 8 succeeded in 112.0s; 257 edits/hour"
    )  # not the rerun's 300
    assert "<table id=attempts>" in "".join(attempts_html(second))


def test_a_summary_from_before_attempts_counts_as_one():
    old = _summary(5, 3, 50.0)  # written without "attempts"
    summary = with_attempts(_summary(8, 0, 10.0), old, {"rows": 8, "pending": 8})
    first, second = summary["attempts"]
    assert (first["kind"], first["succeeded"], first["failed"], first["seconds"]) == (
        "run",
        5,
        3,
        50.0,
    )
    assert (second["kind"], second["edits"], second["succeeded"]) == ("rerun", 3, 3)


def test_rerun_replaces_the_report_files_and_show_lists_the_attempts(make_run, local_root_uri):
    run = make_run(
        local_root_uri, [row("img:1"), row("img:1", target="a green circle"), row("missing:2")]
    )
    plan = run.plan

    def attempt() -> dict:
        stats = [run_shard(run.options, run.run_id, 0)]
        record_shard(run.out, run.run_id, 0)  # as the shard task does
        summary = collect_results(run.options, run.run_id, plan, stats, [], 5.0).summary
        write_report(run.out, run.run_id, summary=summary)
        write_summary(run.options, run.run_id, summary)
        return summary

    first = attempt()
    assert run.out.exists(keys.failures_key(run.run_id))
    store = open_store(local_root_uri)
    store.put("images/missing-2.png", png_bytes(2))  # the user fixes the missing source
    second = attempt()
    assert second["counts"] == {"succeeded": 3, "failed": 0, "skipped": 0}
    assert [a["succeeded"] for a in second["attempts"]] == [2, 1]
    assert [a["edits"] for a in second["attempts"]] == [3, 1]
    assert second["seconds"]["wall"] == 10.0 and first["seconds"]["wall"] == 5.0
    assert not run.out.exists(keys.failures_key(run.run_id))  # the first attempt's list is gone
    assert read_json(run.out, keys.summary_key(run.run_id))["attempts"] == second["attempts"]
    text = format_overview(run_overview(run.out, run.run_id))
    assert "time: 10.0s; 1080 edits/hour" in text
    assert "all 2 attempt(s): 3 succeeded in 10.0s" in text

    # a new run of the same manifest skips the finished edits, with a reason and no error
    plan_run(store.uri("manifest.parquet"), run.options, run_id="again")
    skipped = read_parquet(run.out, keys.skipped_results_key("again")).to_pylist()
    assert {r["reason"] for r in skipped} == {"finished in an earlier run"}
    assert {r["error"] for r in skipped} == {None} and {r["status"] for r in skipped} == {"skipped"}
