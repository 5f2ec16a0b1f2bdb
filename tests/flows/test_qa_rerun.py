"""Edit QA through the flows: `editflow run --qa`, the summary's needs-review count, `editflow show`, and
`editflow rerun RUN --needs-review --settings JSON` re-editing only the flagged edits as a new run (new
edit ids, the originals kept), on a local folder (CLI) and on S3 (moto, the flow). The tiny random model
judges arbitrarily, so the gates here flag everything (text>=100); --qa off is tested on the shard
(tests/tasks/test_qa_shard.py)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from editing.judge import JudgeConfig
from flows.bulk_edit import bulk_edit, rerun_needs_review
from flows.cli import main
from storage import keys
from tasks.options import RunOptions
from tasks.results import REVIEW_OF, review_run_id
from tasks.shard import read_run_results

from .conftest import demo_rows, put, run_args, scene_files, scene_png, write_manifest

PNP = [0, 2, 5]  # PnP rows of demo_rows (attn_t is a PnP setting)
SETTINGS = {"attn_t": 0.8}


def test_flagged_edits_are_shown_and_rerun_as_a_new_run_on_local_output(
    prefect_server, flow_model, tmp_path, capsys
):
    images = scene_files(tmp_path, 2)
    rows = [demo_rows(images)[i] for i in PNP]
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.Table.from_pylist(rows), manifest)
    out = tmp_path / "out"
    args = run_args(manifest, out, flow_model, shard_size=3, run_id="q1")
    assert main([*args, "--qa", "text >= 100"]) == 0  # flagged edits still succeed: exit 0
    text = capsys.readouterr().out
    assert "run q1: 3 succeeded, 0 failed" in text
    assert "needs review: 3 succeeded edit(s) (QA gate text>=100)" in text
    summary = json.loads((out / "runs" / "q1" / "summary.json").read_text())
    assert summary["needs_review"] == 3 and summary["qa"]["gate"] == "text>=100"
    assert summary["qa"]["unet_evals"] == 3 * JudgeConfig().unet_evals() == 24
    plan = json.loads((out / "runs" / "q1" / "plan.json").read_text())
    assert plan["options"]["qa"] == "text>=100"  # recorded: a rerun judges with the same gate

    assert main(["show", f"{out}/runs/q1"]) == 0
    shown = capsys.readouterr().out
    assert "needs review (3, worst first; gate text>=100):" in shown
    margins = [float(ln.split()[5]) for ln in shown.splitlines() if ln.startswith("  row ")]
    assert len(margins) == 3 and margins == sorted(margins)

    first = read_run_results(RunOptions(out=str(out)), "q1")
    originals = {r["edit_id"]: r for r in first.to_pylist()}
    assert main(["rerun", "q1", "--out", str(out), "--model", flow_model, "--needs-review",
                 "--settings", json.dumps(SETTINGS)]) == 0  # fmt: skip
    review = review_run_id("q1", SETTINGS)
    assert f"run {review}: 3 succeeded, 0 failed" in capsys.readouterr().out
    again = read_run_results(RunOptions(out=str(out)), review).to_pylist()
    suffix = keys.digest(SETTINGS, length=8)
    assert {r[REVIEW_OF] for r in again} == set(originals)
    assert all(r["edit_id"] == f"{r[REVIEW_OF]}-{suffix}" for r in again)
    assert all(r["status"] == "succeeded" and r["qa"] for r in again)  # judged by the run's gate
    assert {r["sku"] for r in again} == {r["sku"] for r in rows}
    for r in again:  # new assets with the new settings; the originals are still there
        side = json.loads((out / keys.sidecar_key(r["edit_id"])).read_text())
        assert side["settings"]["attn_t"] == 0.8 and side["run_id"] == review
        assert (out / keys.asset_key(r[REVIEW_OF], "png")).exists()
    # the same command finds its run again: nothing is redone
    assert main(["rerun", "q1", "--out", str(out), "--model", flow_model, "--needs-review",
                 "--settings", json.dumps(SETTINGS)]) == 0  # fmt: skip
    assert f"run {review}: 3 succeeded, 0 failed" in capsys.readouterr().out
    # a setting the flagged edits' method does not take: each refused row names its edit; nothing runs
    bad = json.dumps({"cross_replace_steps": 0.5})  # a P2P setting; these edits are PnP
    assert main(["rerun", "q1", "--out", str(out), "--model", flow_model, "--needs-review",
                 "--settings", bad]) == 2  # fmt: skip
    text = capsys.readouterr().out
    assert "unknown pnp setting(s) ['cross_replace_steps']" in text
    assert f"the needs-review manifest of run q1 with settings {bad}: INVALID" in text
    assert "nothing was run" in text
    assert all(f"(edit {e} of run q1)" in text for e in originals)
    assert not (out / "runs" / review_run_id("q1", json.loads(bad))).exists()
    with pytest.raises(SystemExit) as exited:  # an argument error (exit 2 as the program)
        main(["rerun", "q1", "--out", str(out), "--settings", "{}"])
    assert exited.value.code == 2
    assert "--needs-review and --settings JSON go together" in capsys.readouterr().err


def test_rerun_of_flagged_edits_on_s3(prefect_server, s3_server, s3_client, s3_bucket, flow_model):
    images = [f"{s3_bucket}/images/scene-{i}.png" for i in range(2)]
    for i, uri in enumerate(images):
        put(s3_client, uri, scene_png(i))
    manifest = f"{s3_bucket}/manifests/m.parquet"
    write_manifest(s3_client, manifest, [demo_rows(images)[i] for i in PNP[:2]])
    out = f"{s3_bucket}/out"
    options = RunOptions(out=out, model=flow_model, s3_endpoint=s3_server, qa="text>=100")
    flagged = bulk_edit(manifest, options)
    assert flagged["needs_review"] == 2
    summary = rerun_needs_review(flagged["run_id"], SETTINGS, options)
    assert summary["run_id"] == review_run_id(flagged["run_id"], SETTINGS)
    assert summary["counts"] == {"succeeded": 2, "failed": 0, "skipped": 0}
    results = read_run_results(options, summary["run_id"]).to_pylist()
    originals = read_run_results(options, flagged["run_id"]).column("edit_id").to_pylist()
    assert sorted(r[REVIEW_OF] for r in results) == sorted(originals)


def test_qa_flag_is_checked_as_an_argument(capsys):
    from flows.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["run", "m.parquet", "--out", "o", "--qa", "OFF"]).qa == "off"
    assert parser.parse_args(["restyle", "c.csv", "--style", "s", "--out", "o"]).qa is None
    given = ["run", "m.parquet", "--out", "o", "--qa", "clip>=0.1", "--qa-model", "clip-dir"]
    assert parser.parse_args(given).qa_model == "clip-dir"
    assert parser.parse_args(["run", "m.parquet", "--out", "o"]).qa_model is None
    with pytest.raises(SystemExit) as exited:
        parser.parse_args(["run", "m.parquet", "--out", "o", "--qa", "txt>=1"])
    assert exited.value.code == 2
    assert "unknown metric 'txt'; known: text" in capsys.readouterr().err
