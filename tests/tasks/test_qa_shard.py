"""Edit QA in the shard (tasks.shard.judge_results and run_shard): every succeeded edit is judged in one
batched call, its margin and the gate's reason land in the results table and the sidecar, ``qa="off"``
costs nothing, and a judge that fails flags the edits without failing them. The tiny random model judges
arbitrarily: these tests check the wiring, tests/editing/test_judge.py the judge on the bundled model."""

from __future__ import annotations

import math

import pytest

import tasks.shard as shard_mod
from storage import keys
from storage.writer import read_json
from tasks.shard import read_run_results, run_shard
from tests.tasks.conftest import row


def spy(monkeypatch, name: str) -> list:
    """The calls ``tasks.shard`` makes to `name` (the real function still runs)."""
    calls = []
    real = getattr(shard_mod, name)
    monkeypatch.setattr(shard_mod, name, lambda *a, **k: calls.append((a, k)) or real(*a, **k))
    return calls


ROWS = [row("img:1"), row("img:1", target="a green circle"), row("img:2"), row("missing:3")]


@pytest.mark.parametrize("root", ["local"], indirect=True)
def test_scores_and_gate_reach_the_results_and_sidecars(make_run, root, monkeypatch):
    # a gate no margin passes (every judged edit flagged), so the reasons are known in advance; the
    # second row names contrast prompts (the manifest's qa_contrast column), the others none
    contrasts = [None, " a red square | a yellow circle", None, None]
    rows = [r | {"qa_contrast": c} for r, c in zip(ROWS, contrasts)]
    run = make_run(root, rows, qa="text>=100")
    calls = spy(monkeypatch, "judge_edits")
    stats = run_shard(run.options, run.run_id, 0)
    # one judge call for the shard's three edits (its UNet rows batch across them), with no more rows
    # per UNet call than the run's edit chunks have
    assert len(calls) == 1 and len(calls[0][0][1]) == 3
    assert calls[0][0][4].max_batch == 3 * run.options.max_batch == 24
    assert calls[0][0][5] == [(), ("a red square", "a yellow circle"), ()]
    assert (stats["succeeded"], stats["failed"], stats["needs_review"]) == (3, 1, 3)
    # 2 prompts x 4 samples per edit, 4 prompts for the one with two contrast prompts
    assert stats["qa_unet_evals"] == 4 * shard_mod.JUDGE.unet_evals() == 32
    assert stats["seconds"]["qa"] > 0
    table = read_run_results(run.options, run.run_id)
    got = table.select(["status", "qa_text", "qa"]).to_pylist()
    assert [r["status"] for r in got] == ["succeeded"] * 3 + ["failed"]
    for r in got[:3]:
        assert math.isfinite(r["qa_text"])
        assert r["qa"] == f"text {r['qa_text']:.4f} fails text>=100"
    assert got[3]["qa_text"] is None and got[3]["qa"] is None  # a failed edit is not judged
    for r, res, evals in zip(run.shard().rows[:3], got, [8, 16, 8]):
        side = read_json(run.out, keys.sidecar_key(r.edit_id))["qa"]
        assert side["text"] == pytest.approx(res["qa_text"])
        assert side["needs_review"] is True and side["reasons"] == [res["qa"]]
        assert side["gate"] == "text>=100" and side["unet_evals"] == evals
        assert side["judge"] == {"timesteps": [750, 850], "seeds": [0, 1], "max_batch": 24}
    # the column stays a passthrough column of the results, as written
    assert table.column("qa_contrast").to_pylist() == contrasts


@pytest.mark.parametrize("root", ["local"], indirect=True)
def test_edits_above_the_gate_are_not_flagged_and_margins_follow_the_judge(
    make_run, root, monkeypatch
):
    run = make_run(root, ROWS[:3], qa="text>=-100")
    stats = run_shard(run.options, run.run_id, 0)
    assert stats["needs_review"] == 0
    table = read_run_results(run.options, run.run_id)
    assert table.column("qa").to_pylist() == [None] * 3
    margins = table.column("qa_text").to_pylist()
    # the margins are the judge's on the stored images (re-read here), with the shard's prompts
    from PIL import Image

    from editing.judge import judge_edits
    from tasks.worker import get_model

    model = get_model(run.options.model_ref, device="cpu", dtype="float32")
    rows = run.shard().rows
    images = [
        Image.open(run.out.uri(keys.asset_key(r.edit_id, "png"))).convert("RGB") for r in rows
    ]
    again = judge_edits(
        model, images, [r.source_prompt for r in rows], [r.target_prompt for r in rows]
    )
    assert margins == pytest.approx([s.text for s in again], abs=1e-4)


@pytest.mark.parametrize("root", ["local"], indirect=True)
def test_a_contrast_prompt_the_model_cannot_take_flags_its_edit_alone(make_run, root):
    too_long = "a " + "very " * 100 + "red circle"
    rows = [r | {"qa_contrast": c} for r, c in zip(ROWS[:2], [None, too_long])]
    run = make_run(root, rows, qa="text>=-100")
    stats = run_shard(run.options, run.run_id, 0)
    assert (stats["succeeded"], stats["needs_review"]) == (2, 1)
    got = read_run_results(run.options, run.run_id).select(["qa_text", "qa"]).to_pylist()
    assert math.isfinite(got[0]["qa_text"]) and got[0]["qa"] is None  # judged, passed
    assert got[1]["qa_text"] is None
    assert got[1]["qa"].startswith("not judged: qa_contrast: prompt is too long")


@pytest.mark.parametrize("root", ["local"], indirect=True)
def test_a_clip_model_adds_its_score_and_its_gate_rules(make_run, root, tmp_path):
    from tests.editing.test_judge import make_tiny_clip

    clip = make_tiny_clip(tmp_path / "clip")
    # every margin passes the text rule; no CLIP similarity can reach 2, so the clip rule flags all
    run = make_run(root, ROWS[:3], qa="text>=-100,clip>=2", qa_model=clip)
    stats = run_shard(run.options, run.run_id, 0)
    assert (stats["succeeded"], stats["needs_review"]) == (3, 3)
    got = read_run_results(run.options, run.run_id).select(["qa_text", "qa", "qa_clip"]).to_pylist()
    for r, planned in zip(got, run.shard().rows):
        assert -1.0 <= r["qa_clip"] <= 1.0
        assert r["qa"] == f"clip {r['qa_clip']:.4f} fails clip>=2"
        side = read_json(run.out, keys.sidecar_key(planned.edit_id))["qa"]
        assert side["clip"] == pytest.approx(r["qa_clip"]) and side["clip_model"] == clip
    # ROWS[1] edits the same source as ROWS[0] to another target: another direction, another score
    assert got[0]["qa_clip"] != pytest.approx(got[1]["qa_clip"])


@pytest.mark.parametrize("root", ["local"], indirect=True)
def test_a_run_asking_for_derived_contrasts_judges_swaps_with_them(make_run, root, monkeypatch):
    # --qa-derived 1: the judge derives one contrast prompt for each word swap without a qa_contrast of
    # its own; a gate no margin passes shows which prompt set's rule each edit was held to
    own = [None, "a red square", None]
    rows = [
        r | {"qa_contrast": c}
        for r, c in zip([*ROWS[:2], row("img:2", "a red circle at dusk")], own)
    ]
    run = make_run(root, rows, qa="text>=100,contrast>=100,derived>=100", qa_derived=1)
    calls = spy(monkeypatch, "judge_edits")
    run_shard(run.options, run.run_id, 0)
    assert calls[0][0][4].derived_contrasts == 1
    got = read_run_results(run.options, run.run_id).column("qa").to_pylist()
    # a swap (red -> blue), a row's own contrast, an addition (no single-span swap: the source alone)
    assert [r.split(" ")[0] for r in got] == ["derived", "contrast", "text"]
    evals = [
        read_json(run.out, keys.sidecar_key(r.edit_id))["qa"]["unet_evals"]
        for r in run.shard().rows
    ]
    assert evals == [12, 12, 8]


def test_derived_contrasts_are_a_run_option_with_their_own_gate_rule():
    from editing.gate import DEFAULT_GATE, DERIVED_RULE
    from tasks.options import RunOptions

    assert RunOptions(out="x").qa_derived == 0
    assert RunOptions(out="x", qa_derived=2).qa == f"{DEFAULT_GATE},{DERIVED_RULE}"
    assert RunOptions(out="x", qa_derived=1, qa="off").qa == "off"  # no judging at all
    with pytest.raises(ValueError, match="has no 'derived' rule"):
        RunOptions(out="x", qa_derived=1, qa="text>=0.1")
    for bad in (-1, 3, True, "1"):
        with pytest.raises(ValueError, match="qa_derived must be an integer from 0 to 2"):
            RunOptions(out="x", qa_derived=bad)
    assert RunOptions.from_dict(RunOptions(out="x", qa_derived=1).to_dict()).qa_derived == 1


@pytest.mark.parametrize("root", ["local"], indirect=True)
def test_qa_off_judges_nothing(make_run, root, monkeypatch):
    run = make_run(root, ROWS[:2], qa="off")
    calls = spy(monkeypatch, "judge_edits")
    stats = run_shard(run.options, run.run_id, 0)
    assert calls == [] and stats["qa_unet_evals"] == 0 and "qa" not in stats["seconds"]
    table = read_run_results(run.options, run.run_id)
    assert table.column("qa_text").to_pylist() == [None, None]
    assert table.column("qa").to_pylist() == [None, None]
    sidecar = read_json(run.out, keys.sidecar_key(run.shard().rows[0].edit_id))
    assert "qa" not in sidecar


@pytest.mark.parametrize("root", ["local"], indirect=True)
def test_a_failing_judge_flags_the_edits_and_fails_none(make_run, root, monkeypatch):
    run = make_run(root, ROWS[:2])

    def broken(*args, **kwargs):
        raise RuntimeError("judge out of memory")

    monkeypatch.setattr(shard_mod, "judge_edits", broken)
    stats = run_shard(run.options, run.run_id, 0)
    assert (stats["succeeded"], stats["failed"], stats["needs_review"]) == (2, 0, 2)
    table = read_run_results(run.options, run.run_id)
    assert table.column("qa").to_pylist() == ["not judged: RuntimeError: judge out of memory"] * 2
    assert table.column("qa_text").to_pylist() == [None, None]


def test_the_gate_is_a_run_option_checked_and_recorded():
    from editing.judge import DEFAULT_GATE
    from tasks.options import RunOptions

    assert RunOptions(out="x").qa == DEFAULT_GATE
    assert RunOptions(out="x", qa=" text > 0.2 ,text<0.9").qa == "text>0.2,text<0.9"
    assert RunOptions(out="x", qa="OFF").qa == "off"
    assert RunOptions.from_dict(RunOptions(out="x", qa="text>=0.3").to_dict()).qa == "text>=0.3"
    with pytest.raises(ValueError, match="QA gate spec 'txt>=1': unknown metric 'txt'"):
        RunOptions(out="x", qa="txt>=1")
    with pytest.raises(ValueError, match="'text>=0.1,clip>=0.2' has a clip rule but no CLIP model"):
        RunOptions(out="x", qa="text>=0.1,clip>=0.2")
    assert RunOptions(out="x", qa="clip>=0.2", qa_model="m").qa_model == "m"
    assert RunOptions(out="x").qa_model is None  # no CLIP score unless asked


def test_a_qa_model_that_is_no_clip_model_is_refused_before_the_run(tmp_path, model_dir):
    from tasks.preflight import BadModel, check_qa_model
    from tests.editing.test_judge import make_tiny_clip

    check_qa_model(None)  # no CLIP judge asked for
    check_qa_model(make_tiny_clip(tmp_path / "clip"))
    with pytest.raises(BadModel, match=r"--qa-model .*nowhere: no such folder"):
        check_qa_model(str(tmp_path / "nowhere"))
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(BadModel, match="a 'bert' model, not a CLIP model"):
        check_qa_model(str(tmp_path / "unet"))
    with pytest.raises(
        BadModel, match="no CLIP model there"
    ):  # an SD pipeline folder: no config.json
        check_qa_model(str(model_dir))
