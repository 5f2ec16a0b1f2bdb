"""PnP's source-branch text (issue 10): the published codes compute the injected features with "" ."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from editing.configs import PnPConfig, config_from_settings, config_to_settings
from editing.methods import SourceGroup, Target, edit_pnp

TIGHT = 1e-7  # relative tolerance for "the same computation, batched differently" (fp64)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) / float(b.abs().max())


def test_source_text_setting_is_validated():
    assert PnPConfig().source_text == "source"  # today's behaviour stays the default for now
    assert PnPConfig(source_text="empty").source_text == "empty"
    with pytest.raises(ValueError, match="'blank'"):
        PnPConfig(source_text="blank")
    cfg = config_from_settings("pnp", {"source_text": "empty"})
    assert cfg == PnPConfig(source_text="empty")
    assert config_from_settings("pnp", config_to_settings(cfg)) == cfg
    with pytest.raises(ValueError, match="source_text"):
        config_from_settings("pnp", {"source_text": None})


def test_empty_source_text_injects_the_empty_prompts_features(tiny, cat_inversion):
    """source_text="empty" is exactly the source branch run with the empty prompt's embedding (the
    inversion, its trajectory and corrections, stay the source prompt's)."""
    target = "a photo of a dog"
    [[empty]] = edit_pnp(
        tiny, [SourceGroup(cat_inversion, [Target(target, PnPConfig(source_text="empty"))])]
    )
    [[source]] = edit_pnp(tiny, [SourceGroup(cat_inversion, [Target(target, PnPConfig())])])
    blank_row = dataclasses.replace(cat_inversion, cond=tiny.encode_prompts([""])[0].cpu())
    [[by_hand]] = edit_pnp(tiny, [SourceGroup(blank_row, [Target(target, PnPConfig())])])
    assert _rel_err(empty.latent, by_hand.latent) < TIGHT
    assert float((empty.latent - source.latent).abs().max()) > 1e-3  # the setting acts


def test_both_source_texts_on_one_source_equal_single_edits(tiny, cat_inversion):
    targets = [
        Target("a photo of a dog", PnPConfig(source_text="empty")),
        Target("a photo of a dog", PnPConfig()),
        Target("a photo of a red cat", PnPConfig(source_text="empty")),
    ]
    together = edit_pnp(tiny, [SourceGroup(cat_inversion, targets)])[0]
    for t, r in zip(targets, together):
        [[alone]] = edit_pnp(tiny, [SourceGroup(cat_inversion, [t])])
        assert _rel_err(r.latent, alone.latent) < TIGHT


def test_cached_features_remember_their_source_text(tiny, cat_inversion):
    empty_cfg = PnPConfig(source_text="empty")
    [live] = edit_pnp(
        tiny,
        [SourceGroup(cat_inversion, [Target("a photo of a dog", empty_cfg)])],
        record_features=True,
    )[0:1][0]
    feats = live.features
    assert feats is not None and feats.facts.get("source_text") == "empty"
    [[replay]] = edit_pnp(
        tiny, [SourceGroup(cat_inversion, [Target("a photo of a dog", empty_cfg)], features=feats)]
    )
    assert _rel_err(replay.latent, live.latent) < 2e-3  # features are cached in fp16
    with pytest.raises(ValueError, match="do not cover"):
        edit_pnp(
            tiny,
            [SourceGroup(cat_inversion, [Target("a photo of a dog", PnPConfig())], features=feats)],
        )
