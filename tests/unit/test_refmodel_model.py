"""Tests for the reference model's builders, training helpers and the bundled exported model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from refmodel import REFERENCE_MODEL_DIR
from refmodel.domain import Scene
from refmodel.models import ModelConfig, build_train_scheduler, build_unet
from refmodel.train import (
    PNP_ATTN_LAYERS,
    PNP_FEATURE_LAYERS,
    TrainConfig,
    lr_factor,
    save_checkpoint,
    snr_weights,
    training_caption,
)


def test_unet_has_the_pnp_layers() -> None:
    names = {name for name, _ in build_unet(ModelConfig()).named_modules()}
    assert set(PNP_FEATURE_LAYERS) <= names
    assert set(PNP_ATTN_LAYERS) <= names
    assert len(PNP_ATTN_LAYERS) == 8


def test_model_config_validation() -> None:
    with pytest.raises(ValueError, match="unet_groups"):
        ModelConfig(unet_groups=5)
    assert ModelConfig().latent_size == 16


def test_lr_schedule() -> None:
    assert lr_factor(0.0, 0, 100, 0.05) == pytest.approx(0.01)
    assert lr_factor(0.0, 99, 100, 0.05) == pytest.approx(1.0)
    assert lr_factor(0.5, 1000, 100, 0.05) == pytest.approx(0.525)
    assert lr_factor(1.0, 1000, 100, 0.05) == pytest.approx(0.05)
    assert lr_factor(2.0, 1000, 100, 0.05) == pytest.approx(0.05)


def test_snr_weights() -> None:
    sched = build_train_scheduler()
    t = torch.tensor([0, 500, 999])
    w = snr_weights(sched, t, 5.0)
    assert w[0] < 0.01 and w[2] == pytest.approx(1.0)
    assert torch.equal(snr_weights(sched, t, 0.0), torch.ones(3))


def test_training_captions_cover_variants() -> None:
    rng = np.random.default_rng(0)
    scene = Scene("triangle", "turquoise", "black", 16.0, 16.0, 12.0)
    seen = {training_caption(scene, rng, TrainConfig()) for _ in range(300)}
    assert seen == {
        "",
        "a turquoise triangle on a black background",
        "a triangle on a black background",
        "a turquoise triangle",
        "a triangle",
    }


def test_train_config_validation() -> None:
    with pytest.raises(ValueError, match="vae_minutes"):
        TrainConfig(minutes=5, vae_minutes=10)


def test_save_checkpoint_is_atomic(tmp_path: Path) -> None:
    path = tmp_path / "ck.pt"
    save_checkpoint(path, {"a": 1})
    save_checkpoint(path, {"a": 2})
    assert torch.load(path)["a"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]


bundled = pytest.mark.skipif(
    not (REFERENCE_MODEL_DIR / "model_index.json").exists(), reason="no bundled export"
)


@bundled
def test_bundled_model_folder() -> None:
    files = [p for p in REFERENCE_MODEL_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 20 * 2**20
    weights = [p for p in files if p.suffix in {".bin", ".safetensors", ".pt", ".ckpt"}]
    assert weights and all(p.suffix == ".safetensors" for p in weights)
    facts = json.loads((REFERENCE_MODEL_DIR / "editflow.json").read_text())
    assert facts["native_resolution"] == 32
    assert facts["pnp_feature_layers"] == PNP_FEATURE_LAYERS


@bundled
def test_bundled_model_loads_and_generates() -> None:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(REFERENCE_MODEL_DIR))
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae.config.scaling_factor != 1.0
    out = pipe(
        "a red circle on a gray background",
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert out.shape == (1, 32, 32, 3)
