"""The edits a run's QA gate flagged: listed worst first (tasks.results.needs_review) by the summary,
``editflow show`` and the report, and turned into the manifest of ``rerun --needs-review``
(tasks.results.review_manifest). Results files are written by hand here (no model runs): each test
knows which edits are flagged and by how much."""

from __future__ import annotations

import json
import math

import pytest

from storage import keys
from storage.writer import write_json, write_parquet
from tasks import report
from tasks.results import (
    REVIEW_OF,
    needs_review,
    results_table,
    review_manifest,
    review_run_id,
    write_review_manifest,
)
from tests.tasks.conftest import row

# (status, qa_text, qa) per manifest row
OUTCOMES = [
    ("succeeded", 0.10, "text 0.1000 fails text>=0.137"),
    ("succeeded", 0.50, None),  # passes the gate
    ("succeeded", math.nan, "text is nan"),  # target = source: nothing to compare
    ("failed", None, None),
    ("succeeded", 0.05, "text 0.0500 fails text>=0.137"),
    ("succeeded", None, "not judged: RuntimeError: boom"),
]
WORST_FIRST = [2, 5, 4, 0]  # unjudged/unjudgeable first (in row order), then the lowest margins


def _judged_run(make_run, root):
    rows = [row(f"img:{i % 2}", target=f"a {c} circle", sku=f"S{i}")
            for i, c in enumerate(("blue", "green", "red", "gray", "white", "black"))]  # fmt: skip
    rows[2]["target_prompt"] = rows[2]["source_prompt"]
    rows[0]["settings"] = json.dumps({"feature_t": 0.6, "attn_t": 0.3})
    run = make_run(root, rows, shard_size=3)
    for shard in run.plan["shards"]:
        table = run.shard(shard["index"]).table
        results = []
        for r in table.to_pylist():
            status, text, qa = OUTCOMES[r["row"]]
            clip = 0.25 if r["row"] == 0 else None  # a CLIP score (--qa-model) on one edit
            results.append({"edit_id": r["edit_id"], "status": status, "qa_text": text, "qa": qa,
                            "qa_clip": clip})  # fmt: skip
        write_parquet(run.out, keys.shard_results_key(run.run_id, shard["index"]),
                      results_table(results, table))  # fmt: skip
    return run


@pytest.mark.parametrize("root", ["local"], indirect=True)
def test_flagged_edits_are_listed_worst_first(make_run, root):
    run = _judged_run(make_run, root)
    info = report.run_overview(run.out, run.run_id)
    flagged = info["needs_review"]
    assert [r["row"] for r in flagged] == WORST_FIRST
    assert flagged[0]["qa"] == "text is nan" and flagged[-1]["qa_text"] == 0.10
    # show: the list, the reasons, how to re-edit them; --limit cuts it
    info["summary"] = {"qa": {"gate": "text>=0.137"}}
    text = report.format_overview(info, limit=3)
    assert "needs review (4, worst first; gate text>=0.137):" in text
    listed = text.split("needs review (4")[1]  # after the failures (row 3)
    lines = [ln for ln in listed.splitlines() if ln.startswith("  row ")]
    assert [int(ln.split()[1]) for ln in lines] == WORST_FIRST[:3]
    row4 = next(r for r in run.shard(0).rows + run.shard(1).rows if r.row == 4)
    assert f"row 4  edit {row4.edit_id}  text 0.0500 fails text>=0.137" in text
    assert "  not judged: RuntimeError: boom" in text
    assert "... 1 more (--limit 0 lists all)" in text
    assert (
        f"editflow rerun {run.out.uri()}/runs/{run.run_id} --needs-review --settings JSON" in text
    )
    # the report: a needs-review table, worst first, and the count in the totals
    report.write_report(run.out, run.run_id, summary=None)
    page = run.out.get(keys.report_key(run.run_id)).decode()
    table = page.split("<table id=needs-review>")[1].split("</table>")[0]
    ids = {r.row: r.edit_id for r in run.shard(0).rows + run.shard(1).rows}
    assert [table.index(ids[i]) for i in WORST_FIRST] == sorted(
        table.index(ids[i]) for i in WORST_FIRST
    )
    assert ids[1] not in table and ids[3] not in table  # passed; failed
    assert "<td>text 0.100 · clip 0.250</td>" in table and flagged[-1]["qa_clip"] == 0.25
    assert "<tr><th>needs review</th><td>4</td></tr>" in page
    assert "class=st>needs review</span>" in page  # the flagged edits' captions


def test_needs_review_without_qa_columns_is_empty():
    import pyarrow as pa

    assert needs_review(pa.table({"edit_id": ["a"], "status": ["succeeded"]})) == []


@pytest.mark.parametrize("root", ["local", "s3"], indirect=True)
def test_the_review_manifest_holds_only_the_flagged_edits_with_new_ids(make_run, root):
    run = _judged_run(make_run, root)
    settings = {"attn_t": 0.8}
    table = review_manifest(run.out, run.run_id, run.plan, settings)
    got = table.to_pylist()
    planned = {r.edit_id: r for r in run.shard(0).rows + run.shard(1).rows}
    by_row = {r.row: r for r in planned.values()}
    suffix = keys.digest(settings, length=8)
    assert [r[REVIEW_OF] for r in got] == [by_row[i].edit_id for i in WORST_FIRST]
    assert [r["edit_id"] for r in got] == [f"{by_row[i].edit_id}-{suffix}" for i in WORST_FIRST]
    assert "row" not in table.column_names
    for r in got:
        orig = planned[r[REVIEW_OF]]
        assert (r["image_uri"], r["source_prompt"], r["target_prompt"], r["seed"], r["sku"]) == (
            orig.image_uri, orig.source_prompt, orig.target_prompt, orig.seed, f"S{orig.row}"
        )  # fmt: skip
    # the settings over each edit's own: row 0's feature_t kept, its attn_t replaced
    assert [json.loads(r["settings"]) for r in got] == [settings] * 3 + [
        {"feature_t": 0.6, "attn_t": 0.8}
    ]
    # written once as the review run's manifest; once that run is planned, found again
    review = review_run_id(run.run_id, settings)
    first = write_review_manifest(run.out, run.run_id, run.plan, settings)
    assert first == {
        "run_id": review,
        "manifest": run.out.uri(keys.run_manifest_key(review)),
        "edits": 4,
        "planned": False,
        "originals": [by_row[i].edit_id for i in WORST_FIRST],
    }
    write_json(run.out, keys.plan_key(review), {"run_id": review})
    assert write_review_manifest(run.out, run.run_id, run.plan, settings)["planned"] is True
    # other settings: another review run
    assert review_run_id(run.run_id, {"attn_t": 0.9}) != review


@pytest.mark.parametrize("root", ["local"], indirect=True)
def test_a_run_without_flagged_edits_has_nothing_to_rerun(make_run, root, model_dir, capsys):
    run = make_run(root, [row("img:1")])
    table = run.shard().table
    r = {"edit_id": table.column("edit_id")[0].as_py(), "status": "succeeded", "qa_text": 0.4}
    write_parquet(run.out, keys.shard_results_key(run.run_id, 0), results_table([r], table))
    assert review_manifest(run.out, run.run_id, run.plan, {"attn_t": 0.8}).num_rows == 0
    assert write_review_manifest(run.out, run.run_id, run.plan, {"attn_t": 0.8})["edits"] == 0
    assert not run.out.exists(keys.run_manifest_key(review_run_id(run.run_id, {"attn_t": 0.8})))
    # the CLI says so before starting any flow
    from flows.cli import main

    args = ["rerun", run.run_id, "--out", run.options.out, "--model", model_dir, "--needs-review"]
    assert main([*args, "--settings", '{"attn_t": 0.8}']) == 0
    assert f"run {run.run_id}: no edit needs review; nothing to rerun" in capsys.readouterr().out


def test_a_manifest_may_not_name_a_column_after_the_qa_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from manifests.stream import scan_manifest

    row = {"image_uri": "x.png", "source_prompt": "a red circle", "target_prompt": "a blue circle"}
    path = tmp_path / "m.parquet"
    pq.write_table(pa.Table.from_pylist([row | {"qa": "mine", "qa_text": 1.0}]), path)
    problems = [str(p) for p in scan_manifest(str(path)).problems]
    for name in ("qa", "qa_text"):
        assert (
            f"column {name!r}: column name is reserved for the results table; rename it" in problems
        )
