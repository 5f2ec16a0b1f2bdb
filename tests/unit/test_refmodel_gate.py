"""refmodel.evaluate's gate measurement: the settings it picks on calibration edits are what the judge
would compute with them, the threshold flags at most the allowed share of good edits, and the rates."""

from __future__ import annotations

import numpy as np
import pytest

from editing.judge import JudgeConfig, judge_edits
from editing.model import load_model
from refmodel import REFERENCE_MODEL_DIR, domain
from refmodel.evaluate import (
    EDIT_KINDS,
    JUDGE_GRID,
    GateChoice,
    JudgedEdit,
    _attribute_prompts,
    choose_gate,
    gate_margins,
    gate_rates,
    gate_threshold,
    load_judged,
    save_judged,
)

K = len(JUDGE_GRID.timesteps) * len(JUDGE_GRID.seeds)
SCENE = domain.Scene("square", "red", "gray", 16.0, 16.0, 14.0)


def test_a_subset_of_the_grid_scores_as_the_judge_with_those_settings():
    """The evaluation judges once on JUDGE_GRID and reads subsets; that must equal judging with the
    subset's own JudgeConfig (same noise per seed, same formula)."""
    model = load_model(REFERENCE_MODEL_DIR)
    img = domain.render(SCENE)[0]
    target = domain.caption(SCENE)
    source = domain.caption(domain.Scene("square", "blue", "gray", 16.0, 16.0, 14.0))
    contrasts = _attribute_prompts(SCENE, "colour")
    [grid] = judge_edits(model, [img], [source], [target], JUDGE_GRID, [contrasts])
    edit = JudgedEdit("colour", "pnp", True, np.asarray(grid.errors))
    for prompts, n_contrasts in (("source", 0), ("attribute", len(contrasts))):
        choice = GateChoice(prompts, (350, 750), (1,), 0.0)
        config = JudgeConfig(timesteps=choice.timesteps, seeds=choice.seeds)
        [direct] = judge_edits(
            model, [img], [source], [target], config, [contrasts] if n_contrasts else None
        )
        assert gate_margins([edit], choice)[0] == pytest.approx(direct.text, rel=1e-5)


def test_attribute_prompts_are_every_other_value():
    assert _attribute_prompts(SCENE, "background") == [
        "a red square on a black background",
        "a red square on a white background",
    ]
    assert len(_attribute_prompts(SCENE, "colour")) == len(domain.COLOURS) - 1
    styled = _attribute_prompts(SCENE, "style")
    assert styled[0] == "a red square on a gray background, outlined" and len(styled) == 3


def _synthetic(n_good: int, n_bad: int, informative: int, rng) -> list[JudgedEdit]:
    """Edits whose errors separate good from bad only at one grid sample column."""
    edits = []
    for i in range(n_good + n_bad):
        ok = i < n_good
        err = rng.uniform(0.9, 1.1, size=(2, K))
        err[0, informative] = 0.8 if ok else 1.2  # the target prompt fits the good edits better
        edits.append(JudgedEdit(EDIT_KINDS[i % len(EDIT_KINDS)], "pnp", ok, err))
    return edits


def test_choose_gate_finds_the_informative_timestep_and_caps_the_good_edits_flagged():
    rng = np.random.default_rng(0)
    edits = _synthetic(80, 40, informative=JUDGE_GRID.timesteps.index(650) * 2, rng=rng)
    [choice], [rates] = choose_gate(edits, ("source",), budget=2, max_flagged=0.1)
    assert choice.timesteps == (650,) and choice.seeds == (0,)  # fewest samples among the best
    assert rates["overall"]["recall"] == 1.0
    assert rates["overall"]["flagged_good"] <= 0.1
    margins = gate_margins(edits, choice)
    good = np.asarray([e.success for e in edits])
    assert (margins[good] < choice.threshold).mean() <= 0.1
    assert rates["overall"]["auc"] == 1.0


def test_gate_rates_count_per_kind():
    edits = [
        JudgedEdit("colour", "pnp", True, np.zeros((2, K))),
        JudgedEdit("colour", "pnp", False, np.zeros((2, K))),
        JudgedEdit("colour", "pnp", False, np.zeros((2, K))),
        JudgedEdit("shape", "pnp", True, np.zeros((2, K))),
    ]
    margins = np.asarray([0.1, -0.2, 0.3, -0.1])
    rates = gate_rates(edits, margins, threshold=0.0)
    assert rates["colour"] | {"auc": 0} == {
        "n": 3,
        "failed": 2,
        "recall": 0.5,
        "flagged_good": 0.0,
        "auc": 0,
    }
    assert rates["colour"]["auc"] == 0.5  # one failed edit below the good one, one above
    assert rates["shape"]["flagged_good"] == 1.0 and np.isnan(rates["shape"]["recall"])
    assert rates["overall"]["n"] == 4 and rates["overall"]["recall"] == 0.5


def test_judged_edits_round_trip_through_npz(tmp_path):
    rng = np.random.default_rng(1)
    edits = _synthetic(3, 2, 0, rng) + [JudgedEdit("colour", "p2p_swap", False, np.ones((6, K)))]
    save_judged(tmp_path / "e.npz", edits)
    back = load_judged(tmp_path / "e.npz")
    assert [(e.kind, e.method, e.success) for e in back] == [
        (e.kind, e.method, e.success) for e in edits
    ]
    for a, b in zip(back, edits):
        np.testing.assert_array_equal(a.errors, b.errors)


def test_the_threshold_caps_the_good_edits_flagged_in_each_target_kind():
    """Good colour edits with low margins pull the threshold below what the overall cap would allow."""
    edits = [JudgedEdit("colour", "pnp", True, np.zeros((2, K))) for _ in range(10)]
    edits += [JudgedEdit("style", "pnp", True, np.zeros((2, K))) for _ in range(30)]
    margins = np.concatenate([np.linspace(0.0, 0.09, 10), np.linspace(0.5, 0.8, 30)])
    threshold = gate_threshold(edits, margins, max_flagged=0.1)
    assert threshold == pytest.approx(0.0)  # overall alone: the 4th lowest of 40, 0.03
    flagged = margins < threshold
    assert flagged[:10].mean() <= 0.1 and flagged.mean() <= 0.1
    # the chosen gate's evaluation rows and the recorded spec follow the same rule
    only_style = edits[10:]
    assert gate_threshold(only_style, margins[10:], max_flagged=0.1) == pytest.approx(
        np.quantile(margins[10:], 0.1, method="lower")
    )


def test_the_shipped_defaults_are_what_the_committed_measurement_chose():
    """editing's DEFAULT_GATE and JudgeConfig defaults are refmodel/eval/gate.json's choice (README: Edit
    QA): a new calibration must update them together."""
    import json
    from pathlib import Path

    from editing.gate import DEFAULT_GATE

    gate = json.loads((Path(__file__).parents[2] / "refmodel/eval/gate.json").read_text())
    assert gate["gate"] == DEFAULT_GATE
    for variant in gate["variants"]:
        assert tuple(variant["timesteps"]) == JudgeConfig().timesteps
        assert tuple(variant["seeds"]) == JudgeConfig().seeds
    assert [v["metric"] for v in gate["variants"]] == ["text", "contrast"]


def test_evaluate_gate_fixes_one_setting_and_a_threshold_per_prompt_set():
    from refmodel.evaluate import evaluate_gate

    rng = np.random.default_rng(2)

    def edits(n):
        out = []
        for i in range(n):
            ok = i % 3 != 0
            err = rng.uniform(0.9, 1.1, size=(3, K))  # target, source, one contrast prompt
            err[0, JUDGE_GRID.timesteps.index(750) * 2] = 0.8 if ok else 1.2
            out.append(JudgedEdit(EDIT_KINDS[i % len(EDIT_KINDS)], "pnp", ok, err))
        return out

    out = evaluate_gate(edits(24), edits(12))
    text, contrast = out["variants"]
    assert (text["prompts"], contrast["prompts"]) == ("source", "attribute")
    assert text["timesteps"] == contrast["timesteps"] and text["seeds"] == contrast["seeds"]
    assert out["gate"] == f"text>={text['threshold']:g},contrast>={contrast['threshold']:g}"
    assert out["evaluation_edits"] == 12 and text["evaluation"]["overall"]["n"] == 12


def test_derived_margins_are_what_the_judge_computes_with_derived_contrasts(tmp_path):
    """The derived-contrast measurement judges once against every substitution of the target word and
    reads the derived ones; that must equal the judge's own margin with JudgeConfig(derived_contrasts=n),
    also after the judged edits went through the npz."""
    from refmodel.evaluate import DerivedChoice, _substitutions, derived_margins

    model = load_model(REFERENCE_MODEL_DIR)
    img = domain.render(SCENE)[0]
    target = domain.caption(SCENE)
    source = domain.caption(domain.Scene("square", "blue", "gray", 16.0, 16.0, 14.0))
    attribute = _attribute_prompts(SCENE, "colour")
    subs = _substitutions(model, source, target)
    assert "a gray square on a gray background" in subs and target not in subs
    assert _substitutions(model, target, target + ", dotted") == []  # a restyle: not a swap
    [every] = judge_edits(model, [img], [source], [target], JudgeConfig(), [attribute + subs])
    rows = 1 + len(attribute)
    edit = JudgedEdit("colour", "pnp", True, np.asarray(every.errors), every.prompts, rows)
    save_judged(tmp_path / "d.npz", [edit])
    [back] = load_judged(tmp_path / "d.npz")
    assert (back.prompts, back.attribute_rows) == (edit.prompts, rows)
    for n, samples in ((2, (0, 1, 2, 3)), (4, (0, 2))):
        config = JudgeConfig(seeds=(0,) if len(samples) == 2 else (0, 1), derived_contrasts=n)
        [direct] = judge_edits(model, [img], [source], [target], config)
        assert direct.derived == n
        got = derived_margins(model, [back], DerivedChoice(n, samples, 0.0))[0]
        assert got == pytest.approx(direct.text, rel=1e-5)


def test_judged_edits_with_substitutions_keep_the_attribute_rows_first():
    """--gate-derived's edits are --gate's (same draws) with the substitutions judged after the rows
    --gate reads: those rows and their errors are unchanged (2 steps, 1 source: cheap)."""
    from refmodel.evaluate import judged_edits

    model = load_model(REFERENCE_MODEL_DIR)
    grid = JudgeConfig(timesteps=(750,), seeds=(0,))
    plain = judged_edits(model, 1, 2, grid=grid, methods=("pnp",))
    subs = judged_edits(model, 1, 2, grid=grid, methods=("pnp",), substitutions=True)
    assert [e.kind for e in subs] == list(EDIT_KINDS)
    for a, b in zip(plain, subs):
        rows = b.attribute_rows
        assert rows == a.errors.shape[0] and (a.kind, a.success) == (b.kind, b.success)
        np.testing.assert_allclose(b.errors[:rows], a.errors, rtol=1e-5)
        assert len(b.prompts) == b.errors.shape[0] > rows or b.kind == "style"
