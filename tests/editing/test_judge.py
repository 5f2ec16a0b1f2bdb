"""The edit-QA judge (editing.judge) on the bundled model, and the review gate's spec.

The judge must rank an image that shows its target prompt above one that does not (hand-made scenes
rendered by the shapes domain's own renderer), give the same scores however its rows are chunked, spend
exactly the UNet evaluations its config says, and read nothing back to the host inside its loop.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch

from editing import judge as judge_module
from editing.contrasts import derive_contrasts, swap_span
from editing.judge import (
    DEFAULT_GATE,
    Gate,
    GateRule,
    JudgeConfig,
    JudgeScore,
    judge_edits,
    judge_latents,
    parse_gate,
    text_margin,
)
from editing.model import load_model
from refmodel import REFERENCE_MODEL_DIR, domain

from .test_device import HOST_METHODS, HostReads, _counting


@pytest.fixture(scope="module")
def ref_model():
    return load_model(REFERENCE_MODEL_DIR)


SCENES = [
    domain.Scene("circle", "red", "gray", 16.0, 16.0, 16.0),
    domain.Scene("square", "blue", "black", 12.0, 18.0, 14.0),
    domain.Scene("triangle", "yellow", "white", 17.0, 15.0, 18.0),
    domain.Scene("circle", "turquoise", "black", 15.0, 14.0, 12.0),
]
SWAPS = {"colour": "green", "background": "gray"}


def _pairs(kind: str):
    """(image, the caption it shows, a caption it does not show) per scene, for a `kind` swap."""
    out = []
    for s in SCENES:
        other = replace(s, **{kind: SWAPS[kind]})
        if other == s:
            other = replace(s, **{kind: "purple" if kind == "colour" else "white"})
        out.append((domain.render(s)[0], domain.caption(s), domain.caption(other)))
    return out


@pytest.mark.parametrize("kind", ["colour", "background"])
def test_an_image_that_shows_its_target_prompt_scores_above_one_that_does_not(ref_model, kind):
    pairs = _pairs(kind)
    images = [img for img, _, _ in pairs] * 2
    # first half: the edit "succeeded" (the image shows the target); second half: it did not
    sources = [wrong for _, _, wrong in pairs] + [right for _, right, _ in pairs]
    targets = [right for _, right, _ in pairs] + [wrong for _, _, wrong in pairs]
    scores = judge_edits(ref_model, images, sources, targets, JudgeConfig())
    n = len(pairs)
    for good, bad in zip(scores[:n], scores[n:]):
        assert good.text > 0 > bad.text
        assert good.text > bad.text
    # the gate passes every matching image and flags every mismatched one
    gate = parse_gate(DEFAULT_GATE)
    assert [gate.check(s) for s in scores[:n]] == [[]] * n
    assert all(gate.check(s) for s in scores[n:])


def test_contrast_prompts_join_the_comparison(ref_model):
    img, right, wrong = _pairs("colour")[0]
    others = [domain.caption(replace(SCENES[0], colour=c)) for c in ("blue", "yellow")]
    cfg = JudgeConfig(timesteps=(300, 500), seeds=(0,))
    [plain, contrasted] = judge_edits(
        ref_model, [img, img], [wrong, wrong], [right, right], cfg, [[], [*others, right, wrong]]
    )
    assert plain.prompts == (right, wrong)
    # duplicates of the target and source are dropped; the contrasts follow the source
    assert contrasted.prompts == (right, wrong, *others)
    np.testing.assert_allclose(contrasted.errors[:2], plain.errors, rtol=1e-5)
    assert contrasted.text > 0
    # only a contrast-judged edit carries the gate's contrast metric (the same margin)
    assert (plain.contrasts, contrasted.contrasts) == (0, 2)
    assert plain.as_dict() == {"text": plain.text}
    assert contrasted.as_dict() == {"text": contrasted.text, "contrast": contrasted.text}


def test_contrast_prompts_catch_an_edit_that_shows_another_value(ref_model):
    """Asked for purple, the edit made the object green: against the source prompt alone the target
    can still look better (the square), against every other colour the green prompt wins."""
    images, sources, targets, contrasts = [], [], [], []
    for s in SCENES:
        wanted = replace(s, colour="purple")
        images.append(domain.render(replace(s, colour="green"))[0])
        sources.append(domain.caption(s))
        targets.append(domain.caption(wanted))
        contrasts.append([domain.caption(replace(s, colour=c)) for c in domain.COLOURS])
    plain = judge_edits(ref_model, images, sources, targets)
    contrasted = judge_edits(ref_model, images, sources, targets, None, contrasts)
    gate = parse_gate(DEFAULT_GATE)
    for p, c in zip(plain, contrasted):
        assert c.contrasts == len(domain.COLOURS) - 2  # the target and the source are not contrasts
        assert c.text < min(p.text, 0)
        assert gate.check(c) and gate.check(c)[0].startswith("contrast ")
    assert not gate.check(plain[1])  # the blue square: passed against its source prompt alone


def test_scores_do_not_depend_on_how_rows_are_chunked(ref_model):
    pairs = _pairs("colour")
    images = [img for img, _, _ in pairs]
    sources = [wrong for _, _, wrong in pairs]
    targets = [right for _, right, _ in pairs]
    cfg = JudgeConfig(timesteps=(150, 450, 850), seeds=(0, 3))
    whole = judge_edits(ref_model, images, sources, targets, replace(cfg, max_batch=1000))
    chunked = judge_edits(ref_model, images, sources, targets, replace(cfg, max_batch=5))
    for a, b in zip(whole, chunked):
        assert a.prompts == b.prompts
        np.testing.assert_allclose(a.errors, b.errors, rtol=1e-5)
        assert a.text == pytest.approx(b.text, rel=1e-5, abs=1e-6)
    # each edit alone scores as in the batch
    alone = judge_edits(ref_model, images[2:3], sources[2:3], targets[2:3], cfg)[0]
    np.testing.assert_allclose(alone.errors, whole[2].errors, rtol=1e-5)


@pytest.mark.parametrize(
    "config, contrasts",
    [(JudgeConfig(), None), (JudgeConfig(timesteps=(50, 950), seeds=(1, 2, 3), max_batch=7), 2)],
)
def test_unet_evaluations_per_edit_are_what_the_config_says(ref_model, config, contrasts):
    pairs = _pairs("background")
    rows = []
    hook = ref_model.unet.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
    extra = None
    if contrasts:
        extra = [[f"a {s.shape} on a {b} background" for b in ("gray", "black")] for s in SCENES]
    try:
        scores = judge_edits(
            ref_model,
            [img for img, _, _ in pairs],
            [w for _, _, w in pairs],
            [r for _, r, _ in pairs],
            config,
            extra,
        )
    finally:
        hook.remove()
    n_prompts = 2 + (contrasts or 0)
    per_edit = config.unet_evals(n_prompts)
    assert per_edit == n_prompts * len(config.timesteps) * len(config.seeds)
    assert sum(rows) == per_edit * len(pairs)
    assert max(rows) <= config.max_batch
    assert len(rows) == math.ceil(per_edit * len(pairs) / config.max_batch)
    assert all(s.unet_evals == per_edit for s in scores)
    assert JudgeConfig().unet_evals() <= 16  # the cost target for the default


def test_no_host_round_trip_inside_the_judge_loop(ref_model, monkeypatch):
    real = judge_module._errors
    reads: Counter = Counter()

    def watched(*args, **kwargs):
        patches = {m: getattr(torch.Tensor, m) for m in HOST_METHODS}
        for m, orig in patches.items():
            setattr(torch.Tensor, m, _counting(m, orig, reads))
        try:
            with HostReads() as mode:
                return real(*args, **kwargs)
        finally:
            for m, orig in patches.items():
                setattr(torch.Tensor, m, orig)
            reads.update(mode.seen)

    monkeypatch.setattr(judge_module, "_errors", watched)
    img, right, wrong = _pairs("colour")[0]
    judge_edits(ref_model, [img] * 3, [wrong] * 3, [right] * 3, JudgeConfig(max_batch=4))
    assert reads == Counter(), f"host reads inside the judge's loop: {dict(reads)}"


def test_judge_latents_matches_judge_edits_on_encoded_images(ref_model):
    img, right, wrong = _pairs("colour")[1]
    z = ref_model.encode_image(ref_model.prepare_image(img))[0]
    cfg = JudgeConfig(timesteps=(250,), seeds=(0,))
    [a] = judge_latents(ref_model, [z], [wrong], [right], cfg)
    [b] = judge_edits(ref_model, [img], [wrong], [right], cfg)
    np.testing.assert_allclose(a.errors, b.errors, rtol=1e-6)


def test_judge_input_errors_are_clear(ref_model):
    img, right, wrong = _pairs("colour")[0]
    with pytest.raises(ValueError, match="2 edits for 1 source and 2 target prompts"):
        judge_edits(ref_model, [img, img], [wrong], [right, right])
    with pytest.raises(ValueError, match="1 edits for 2 contrast prompt lists"):
        judge_edits(ref_model, [img], [wrong], [right], None, [[], []])
    with pytest.raises(ValueError, match=r"\[1000\] are beyond this model's 1000 training"):
        judge_edits(ref_model, [img], [wrong], [right], JudgeConfig(timesteps=(999, 1000)))
    # an edit whose target is its source has nothing to compare against: NaN, flagged by the gate
    [same] = judge_edits(ref_model, [img], [right], [right], JudgeConfig(timesteps=(500,)))
    assert math.isnan(same.text)
    assert parse_gate("text>=0").check(same) == ["text is nan"]
    assert judge_edits(ref_model, [], [], []) == []


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"timesteps": ()}, "timesteps must be a non-empty tuple"),
        ({"timesteps": [100]}, "timesteps must be a non-empty tuple"),
        ({"timesteps": (100, -1)}, "non-negative ints"),
        ({"timesteps": (100, 100)}, "repeated values"),
        ({"seeds": (0.5,)}, "seeds must be a non-empty tuple"),
        ({"seeds": (True,)}, "seeds must be a non-empty tuple"),
        ({"max_batch": 0}, "max_batch must be an int >= 1"),
        ({"derived_contrasts": -1}, "derived_contrasts must be an int >= 0"),
        ({"derived_contrasts": True}, "derived_contrasts must be an int >= 0"),
    ],
)
def test_judge_config_is_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        JudgeConfig(**kwargs)


def test_judge_config_settings_round_trip():
    cfg = JudgeConfig(timesteps=(50, 650), seeds=(3,), max_batch=9, derived_contrasts=1)
    assert cfg.to_settings() == {
        "timesteps": [50, 650],
        "seeds": [3],
        "max_batch": 9,
        "derived_contrasts": 1,
    }
    assert JudgeConfig.from_settings(cfg.to_settings()) == cfg
    assert (
        "derived_contrasts" not in JudgeConfig().to_settings()
    )  # off: as before derivation existed
    with pytest.raises(ValueError, match=r"unknown judge setting\(s\) \['steps'\]"):
        JudgeConfig.from_settings({"steps": 3})
    with pytest.raises(ValueError, match="timesteps must be a non-empty tuple"):
        JudgeConfig.from_settings({"timesteps": "100"})


def test_text_margin_is_a_relative_gap_to_the_closest_alternative():
    # target error 0.9, source 1.1 at both samples: gap 0.2 over a mean of 1.0
    errors = torch.tensor([[0.9, 0.9], [1.1, 1.1]], dtype=torch.float64)
    assert float(text_margin(errors)) == pytest.approx(0.2)
    assert float(text_margin(errors * 100)) == pytest.approx(0.2)  # scale-free
    assert float(text_margin(errors.flip(0))) == pytest.approx(-0.2)
    # the others' mean (1.0) equals the target's error, but one of them (0.0) explains the image better
    three = torch.tensor([[1.0], [2.0], [0.0]], dtype=torch.float64)
    assert float(text_margin(three)) == pytest.approx(-1.0)
    # the closest alternative per sample: 1.2 at the first, 1.1 at the second
    per_sample = torch.tensor([[1.0, 1.0], [1.2, 1.4], [1.5, 1.1]], dtype=torch.float64)
    expected = ((1.2 - 1.0) / (3.7 / 3) + (1.1 - 1.0) / (3.5 / 3)) / 2
    assert float(text_margin(per_sample)) == pytest.approx(expected)
    with pytest.raises(ValueError, match="at least 2 prompts"):
        text_margin(torch.ones(1, 3))


# ----------------------------------------------------------------------------- the gate


@pytest.mark.parametrize(
    "spec, rules",
    [
        ("text>=0.02", (GateRule("text", ">=", 0.02),)),
        (" text > -0.1 ", (GateRule("text", ">", -0.1),)),
        ("text>=1e-3,text<0.9", (GateRule("text", ">=", 0.001), GateRule("text", "<", 0.9))),
        (
            "text>=0.1,contrast>=0.02",
            (GateRule("text", ">=", 0.1), GateRule("contrast", ">=", 0.02)),
        ),
        ("off", ()),
        ("OFF", ()),
    ],
)
def test_gate_specs_parse_and_round_trip(spec, rules):
    gate = parse_gate(spec)
    assert gate.rules == rules
    assert gate.enabled == bool(rules)
    assert parse_gate(gate.spec) == gate


@pytest.mark.parametrize(
    "spec, message",
    [
        ("", "non-empty string like 'text>=0.02' or 'off'"),
        ("text", "cannot read 'text'; expected METRIC OP NUMBER"),
        ("text=>0.1", "cannot read 'text=>0.1'"),
        ("text>=0.1,", "cannot read ''"),
        ("text>=abc", "cannot read 'text>=abc'"),
        ("text>=1e", "'1e' is not a number"),
        ("clap>=0.2", "unknown metric 'clap'; known: text, contrast, derived, clip"),
        (None, "non-empty string"),
    ],
)
def test_bad_gate_specs_say_what_is_wrong(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_gate(spec)


def test_gate_check_gives_a_reason_per_failed_rule():
    gate = parse_gate("text>=0.05,text<0.5")
    score = JudgeScore(text=0.01, prompts=("a", "b"), errors=((1.0,), (1.0,)), unet_evals=2)
    assert gate.check(score) == ["text 0.0100 fails text>=0.05"]
    assert gate.check({"text": 0.7}) == ["text 0.7000 fails text<0.5"]
    assert gate.check({"text": 0.2}) == []
    assert gate.check({}) == ["no text score", "no text score"]
    assert Gate().check({"text": float("nan")}) == []  # off: every edit passes
    assert parse_gate(DEFAULT_GATE).enabled


def test_contrast_rules_hold_contrast_judged_edits_and_replace_their_text_rules():
    both = parse_gate("text>=0.1,contrast>=0.02")
    assert both.check({"text": 0.05}) == ["text 0.0500 fails text>=0.1"]  # no contrasts: text rules
    assert both.check({"text": 0.2}) == []
    assert both.check({"text": 0.05, "contrast": 0.05}) == []  # contrasts: their rule alone
    assert both.check({"text": 0.01, "contrast": 0.01}) == ["contrast 0.0100 fails contrast>=0.02"]
    assert both.check({"contrast": float("nan")}) == ["contrast is nan"]
    assert both.check({}) == ["no text score"]  # not judged: flagged
    # a gate without contrast rules holds every edit to its text rules
    assert parse_gate("text>=0.1").check({"text": 0.05, "contrast": 0.05}) == [
        "text 0.0500 fails text>=0.1"
    ]
    assert parse_gate("contrast>=0.02").check({"text": -1.0}) == []  # only contrast rules
    # derived contrast prompts (editing.contrasts) have their own rule the same way; a row's own
    # contrasts come first
    three = parse_gate("text>=0.1,contrast>=0.02,derived>=-0.1")
    assert three.check({"text": -0.05, "derived": -0.05}) == []
    assert three.check({"text": -0.2, "derived": -0.2}) == ["derived -0.2000 fails derived>=-0.1"]
    assert three.check({"text": 0.05}) == ["text 0.0500 fails text>=0.1"]
    assert both.check({"text": 0.05, "derived": 0.05}) == ["text 0.0500 fails text>=0.1"]


# ----------------------------------------------------------------------------- the CLIP judge


def make_tiny_clip(folder) -> str:
    """A tiny random CLIPModel (built in memory from a CLIPConfig, the bundled model's tokenizer) and its
    processor, saved to `folder`: what --qa-model loads, nothing downloaded."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(REFERENCE_MODEL_DIR / "tokenizer"))
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
           "pad_token_id": tok.pad_token_id}  # fmt: skip
    config = CLIPConfig(
        text_config={"vocab_size": tok.vocab_size, "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 2, **ids},
        vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 32,
                       "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2},
        projection_dim=16,
    )  # fmt: skip
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=tok).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from editing.clip_judge import load_clip

    return load_clip(make_tiny_clip(tmp_path_factory.mktemp("clip")))


def test_clip_directional_is_the_cosine_of_the_image_and_text_directions(tiny_clip):
    from editing.clip_judge import clip_directional

    src_scene = SCENES[0]
    new_scene = replace(src_scene, colour="blue")
    src, new = domain.render(src_scene)[0], domain.render(new_scene)[0]
    s, t = domain.caption(src_scene), domain.caption(new_scene)
    scores = clip_directional(tiny_clip, [src, src, src], [new, new, src], [s, t, s], [t, s, t])
    # by hand, with the model's own projections
    m, p = tiny_clip.model, tiny_clip.processor
    with torch.no_grad():
        txt = m.get_text_features(**p(text=[s, t], return_tensors="pt", padding=True)).pooler_output
        img = m.get_image_features(**p(images=[src, new], return_tensors="pt")).pooler_output
    txt, img = txt / txt.norm(dim=-1, keepdim=True), img / img.norm(dim=-1, keepdim=True)
    expected = torch.nn.functional.cosine_similarity(img[1] - img[0], txt[1] - txt[0], dim=0)
    assert scores[0] == pytest.approx(float(expected), abs=1e-5)
    assert scores[1] == pytest.approx(-scores[0], abs=1e-5)  # the prompts the other way round
    assert math.isnan(scores[2])  # an edit that is its source has no direction
    assert -1.0 <= scores[0] <= 1.0


def test_clip_judge_errors_are_clear(tiny_clip, tmp_path):
    from editing.clip_judge import clip_directional, load_clip

    img = domain.render(SCENES[0])[0]
    with pytest.raises(ValueError, match="2 edits for 1 sources, 2 source and 2 target prompts"):
        clip_directional(tiny_clip, [img], [img, img], ["a", "b"], ["c", "d"])
    assert clip_directional(tiny_clip, [], [], [], []) == []
    with pytest.raises(ValueError, match="cannot load a CLIP model and processor"):
        load_clip(str(tmp_path))  # an empty folder


# ----------------------------------------------------------------------------- derived contrast prompts


@pytest.mark.parametrize(
    "source, target, span",
    [
        ("a red circle", "a green circle", (2, 7, "green", "red")),
        ("a Red circle", "a dark green circle", (2, 12, "dark green", "Red")),
        ("a red circle on gray", "a red circle on white", (16, 21, "white", "gray")),
        ("a red circle, plain", "a red circle, dotted", (14, 20, "dotted", "plain")),
        ("a red circle", "a red circle, dotted", None),  # an addition (a restyle)
        ("a red circle, dotted", "a red circle", None),  # a deletion
        ("a red circle on gray", "a blue circle on white", None),  # two places
        ("a red circle", "a big red square", None),  # more than one place, no word inside
        ("a circle", "a very very big red circle", None),  # longer than a swap
        ("a red circle", "a red circle", None),
    ],
)
def test_swap_span_finds_the_one_swapped_span(source, target, span):
    assert swap_span(source, target) == span


def test_derived_contrasts_are_the_target_words_nearest_tokens_on_the_bundled_model(ref_model):
    table = ref_model.text_encoder.get_input_embeddings().weight.detach()
    vocab = ref_model.tokenizer.get_vocab()

    def cos(a: str, b: str) -> float:
        va = table[ref_model.tokenizer(a, add_special_tokens=False).input_ids].mean(0)
        return float(torch.nn.functional.cosine_similarity(va, table[vocab[f"{b}</w>"]], dim=0))

    src, tgt = "a red circle on a gray background", "a green circle on a gray background"
    # what the toy model's embedding table holds: green's nearest words are the colours white and black
    assert derive_contrasts(ref_model, src, tgt, 2) == (
        "a white circle on a gray background",
        "a black circle on a gray background",
    )
    assert cos("green", "white") > cos("green", "black") > cos("green", "purple")
    # a word of two tokens ("turqu" + "oise"): the mean of its tokens, its own tokens and the source
    # word left out; nearest first
    words = [
        p.split()[1] for p in derive_contrasts(ref_model, "a blue circle", "a turquoise circle", 3)
    ]
    assert len(words) == 3 and not {"oise", "blue", "turquoise"} & set(words)
    assert [cos("turquoise", w) for w in words] == sorted(
        (cos("turquoise", w) for w in words), reverse=True
    )
    # not a single-span swap, or none asked: none
    assert (
        derive_contrasts(ref_model, src, src.replace("background", "background, dotted"), 2) == ()
    )
    assert derive_contrasts(ref_model, src, tgt, 0) == ()


def test_derived_contrasts_join_the_judge_unless_the_row_gives_its_own(ref_model):
    img, right, wrong = _pairs("colour")[0]  # a red circle: right = red, wrong = green
    restyle = right + ", dotted"
    cfg = JudgeConfig(derived_contrasts=2)
    own = ["a purple circle on a gray background"]
    swap, added, given = judge_edits(
        ref_model, [img] * 3, [wrong, right, wrong], [right, restyle, right], cfg, [[], [], own]
    )
    assert swap.prompts == (right, wrong, *derive_contrasts(ref_model, wrong, right, 2))
    assert (swap.derived, swap.contrasts, swap.unet_evals) == (2, 0, 16)
    assert swap.as_dict() == {"text": swap.text, "derived": swap.text}  # the gate's derived rules
    assert added.prompts == (restyle, right) and added.derived == 0 and added.unet_evals == 8
    # the row's own contrast prompts (a manifest's qa_contrast) replace the derived ones
    assert given.prompts == (right, wrong, *own)
    assert (given.derived, given.contrasts) == (0, 1) and "contrast" in given.as_dict()
    # without contrast lists at all, every swap derives its own
    [alone] = judge_edits(ref_model, [img], [wrong], [right], cfg)
    assert alone.prompts == swap.prompts
    np.testing.assert_allclose(alone.errors, swap.errors, rtol=1e-5)


def test_the_default_judge_stays_within_the_cost_target():
    cfg = JudgeConfig()
    assert (
        cfg.unet_evals(2 + cfg.derived_contrasts) <= 16
    )  # the cap, a swap's derived included
