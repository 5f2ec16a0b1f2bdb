"""Output shapes: the aspect ratio kept within one latent cell, and ``output_size`` (source / model).

Sizes are checked on the bundled model (VAE x2, UNet x8: 16 px cells before) and a tiny SD-shaped model
(VAE x8, UNet x8: SD's 64 px multiples before, 8 px now); the engine runs at latent sides that are not
multiples of the UNet's 2**3 (diffusers' UNet upsamples to each skip connection's size)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from editing.configs import P2PConfig, PnPConfig
from editing.inversion import invert
from editing.methods import SourceGroup, Target, edit
from editing.model import load_model
from refmodel.toy import ToySpec, build_toy_pipeline
from storage import keys
from storage.writer import read_json
from tasks.options import RunOptions
from tasks.runs import trusted_options
from tasks.shard import run_shard

from .conftest import row

# 1:1, 2:1, 3:4, 16:9 (and the issue's 256x128)
SOURCES = [(256, 256), (256, 128), (192, 256), (320, 180), (1920, 1080)]
SD_SHAPED = ToySpec(vae_channels=(8, 8, 8, 8), latent_size=8)  # VAE x8, native 64 px, like SD's 512


@pytest.fixture(scope="module")
def bundled():
    from refmodel import REFERENCE_MODEL_DIR

    return load_model(REFERENCE_MODEL_DIR, device="cpu")


@pytest.fixture(scope="module")
def sd_shaped(tmp_path_factory):
    return load_model(
        build_toy_pipeline(tmp_path_factory.mktemp("sd-shaped"), SD_SHAPED), device="cpu"
    )


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.uniform(0, 255, size=(3, 4, 3)).astype(np.uint8)
    return Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)


@pytest.mark.parametrize("which", ["bundled", "sd_shaped"])
@pytest.mark.parametrize("size", SOURCES, ids=[f"{w}x{h}" for w, h in SOURCES])
def test_fit_keeps_the_aspect_ratio_within_one_latent_cell(request, which, size):
    model = request.getfixturevalue(which)
    cell = model.vae_scale_factor
    assert model.pixel_multiple == cell  # diffusers' UNet takes any latent size
    width, height = size
    w, h = model.target_size(width, height)
    assert w % cell == 0 and h % cell == 0
    scale = model.native_size / (width * height) ** 0.5  # the area is the model's native one
    assert abs(w - width * scale) <= cell / 2 and abs(h - height * scale) <= cell / 2
    pixels = model.prepare_image(picture(width, height))
    assert (pixels.shape[3], pixels.shape[2]) == (w, h)


def test_the_issues_examples(bundled, sd_shaped):
    assert bundled.target_size(256, 128) == (46, 22)  # was 48x16
    assert sd_shaped.target_size(256, 128) == (88, 48)  # SD's rule at 64 px: 2:1 was 704x384 at 512
    assert (sd_shaped.native_size, sd_shaped.size_multiple) == (64, 64)


def test_a_square_source_at_the_native_size_is_not_resampled(bundled):
    """The demo's sources (32x32 for the bundled model): the same pixels in and out as before."""
    image = picture(32, 32)
    pixels = bundled.prepare_image(image)
    expected = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    assert np.array_equal(pixels[0].permute(1, 2, 0).numpy(), expected)
    assert bundled.restore_image(image, (32, 32)) is image


def test_restore_image_maps_back_to_the_source_region(bundled):
    edit_image = Image.new("RGB", (46, 22))
    assert bundled.restore_image(edit_image, (256, 128)).size == (256, 128)
    # 'square' shows the centred square of the shorter side
    assert bundled.restore_image(Image.new("RGB", (32, 32)), (256, 128), "square").size == (
        128,
        128,
    )


@pytest.mark.parametrize("size", [(88, 48), (48, 64), (72, 72)], ids=["16:9", "3:4", "1:1"])
def test_the_engine_edits_at_latent_sides_the_unet_does_not_divide(sd_shaped, size):
    """Latents 11x6 and 6x8 (8 px multiples, not 64): inversion, PnP, P2P (with self-attention replaced
    and local blend reading maps at the ceil-rounded levels) run; Direct Inversion still reconstructs."""
    image = picture(*size)
    inv = invert(sd_shaped, image, "a photo of a dog", num_steps=2, size_policy="exact")
    assert inv.latent_shape[-2:] == (size[1] // 8, size[0] // 8)
    same_pnp = PnPConfig(target_correction=True, inject_uncond=False)
    same_p2p = P2PConfig(target_correction=True)
    blend = P2PConfig(
        blend_source_words=("dog",), blend_target_words=("cat",), blend_fraction=1 / 4
    )
    targets = [
        Target(inv.source_prompt, same_pnp),
        Target(inv.source_prompt, same_p2p),
        Target("a photo of a cat", blend),
    ]
    results = [r for group in edit(sd_shaped, [SourceGroup(inv, targets)]) for r in group]
    for r in results:
        assert not isinstance(r, Exception), r
        assert r.image.size == size
    for r in results[:2]:  # the source prompt as target gives back the source's latent
        assert float((r.latent - inv.latents[0]).abs().max()) < 1e-3


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("output_size", ["source", "model"])
def test_run_shard_writes_edits_at_the_output_size(make_run, local_root_uri, output_size):
    from storage import open_store

    store = open_store(local_root_uri)
    store.put("src/wide.png", png(picture(64, 32)))  # 2:1
    store.put("src/tall.png", png(picture(24, 32)))  # 3:4
    rows = [row(store.uri("src/wide.png")), row(store.uri("src/tall.png"))]
    run = make_run(local_root_uri, rows, output_size=output_size)
    assert run.plan["options"]["output_size"] == output_size
    stats = run_shard(run.options, run.run_id, 0)
    assert stats["succeeded"] == 2
    model_sizes = [[22, 12], [14, 18]]  # the tiny model: native 16 px, 2 px cells
    for r, source, model_size in zip(run.shard().rows, [[64, 32], [24, 32]], model_sizes):
        sidecar = read_json(run.out, keys.sidecar_key(r.edit_id))
        image = Image.open(io.BytesIO(run.out.get(keys.asset_key(r.edit_id, "png"))))
        expected = source if output_size == "source" else model_size
        assert (sidecar["source_size"], sidecar["model_size"]) == (source, model_size)
        assert sidecar["size"] == list(image.size) == expected


def test_output_size_is_checked_and_a_rerun_of_an_older_run_keeps_the_model_size():
    with pytest.raises(ValueError, match="output_size must be one of"):
        RunOptions(out="x", output_size="huge")
    assert RunOptions(out="x").output_size == "source"
    old = RunOptions(out="x").to_dict()
    del old["output_size"]  # planned before the option existed: its edits are at the model's size
    assert trusted_options({"options": old}, RunOptions(out="x"), run_id="r").output_size == "model"


def test_p2p_layer_choices_count_the_unets_rounded_up_levels():
    from editing.p2p import level_positions, local_blend_mask

    # a 9x9 latent's levels: 81, 5x5, 3x3, 2x2 positions (stride-2 convs round odd sides up)
    assert (
        level_positions((9, 9), 0.25, at_most=True) == 25
    )  # self-attention replaced from 5x5 down
    assert level_positions((9, 9), 1 / 16) == 9  # local blend reads the 3x3 maps
    assert (
        level_positions((8, 8), 0.3, at_most=True) == 16
        and level_positions((8, 8), 0.0, at_most=True) == 0
    )
    import torch

    mask = local_blend_mask(torch.ones(9, 1), torch.ones(9, 1), (9, 9), 0.5)
    assert tuple(mask.shape) == (1, 9, 9)
