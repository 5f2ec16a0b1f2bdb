"""Model loading and the model-level helpers: weights policy, sizes, prompts, prediction types."""

from __future__ import annotations

import shutil

import pytest
import torch
from PIL import Image

from editing.configs import P2PConfig, PnPConfig
from editing.inversion import NonFiniteError, invert
from editing.methods import SourceGroup, Target, edit
from editing.model import PickleWeightsRefused, load_model
from refmodel.toy import TINY, build_toy_pipeline

from .conftest import STEPS, make_image


def test_loaded_model_facts(tiny):
    assert tiny.device.type == "cpu"
    assert tiny.native_size == 16 and tiny.size_multiple == 16 and tiny.vae_scale_factor == 2
    assert tiny.revision.startswith("local-")
    assert tiny.prediction_type == "epsilon"


def test_pickle_only_weights_are_refused_unless_allowed(tiny_dir, tmp_path):
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_dir, folder)
    from safetensors.torch import load_file

    st = folder / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(st), folder / "unet" / "diffusion_pytorch_model.bin")
    st.unlink()
    with pytest.raises(PickleWeightsRefused, match=r"only pickle weights.*allow_pickle"):
        load_model(folder)
    model = load_model(folder, allow_pickle=True)
    assert model.unet is not None


def test_unknown_hub_id_is_a_clear_error():
    with pytest.raises(
        ValueError, match="neither a local folder nor in the local Hugging Face cache"
    ):
        load_model("no-such-org/no-such-model-xyz")


def test_not_a_pipeline_folder(tmp_path):
    with pytest.raises(ValueError, match="no unet/ subfolder"):
        load_model(tmp_path)


@pytest.mark.parametrize(
    "size,policy,expected",
    [
        ((16, 16), "fit", (16, 16)),
        ((64, 16), "fit", (32, 8)),  # 4:1 kept: sides are multiples of the VAE factor (2)
        ((20, 40), "square", (16, 16)),
        ((32, 48), "exact", (32, 48)),
    ],
)
def test_size_policy(tiny, size, policy, expected):
    pixels = tiny.prepare_image(Image.new("RGB", size, (10, 200, 30)), policy)
    assert (pixels.shape[3], pixels.shape[2]) == expected
    assert torch.allclose(pixels[0, :, 0, 0], torch.tensor([10, 200, 30]) / 127.5 - 1)


def test_exact_policy_refuses_odd_sizes(tiny):
    with pytest.raises(ValueError, match="multiples of 2"):
        tiny.prepare_image(Image.new("RGB", (21, 16)), "exact")


def test_too_long_prompt_is_refused(tiny):
    with pytest.raises(ValueError, match="prompt is too long"):
        tiny.tokenize("a " * 100)


def test_v_prediction_model_reconstructs(tmp_path):
    from dataclasses import replace

    folder = build_toy_pipeline(tmp_path / "v", replace(TINY, prediction_type="v_prediction"))
    model = load_model(folder, dtype=torch.float64)
    assert model.prediction_type == "v_prediction"
    inv = invert(model, make_image(2), "a photo of a cat", num_steps=STEPS)
    for cfg in (
        PnPConfig(target_correction=True, inject_uncond=False),
        P2PConfig(target_correction=True),
    ):
        [[res]] = edit(model, [SourceGroup(inv, [Target("a photo of a cat", cfg)])])
        assert float((res.latent - inv.latents[0]).abs().max()) < 1e-9


def test_non_finite_inversion_fails_clearly(tiny32):
    unet = tiny32.unet
    weight = unet.conv_out.weight
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.fill_(float("nan"))
        with pytest.raises(NonFiniteError, match="non-finite"):
            invert(tiny32, make_image(0), "a photo of a cat", num_steps=STEPS)
    finally:
        with torch.no_grad():
            weight.copy_(saved)
