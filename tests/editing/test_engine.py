"""Engine invariants on a tiny SD-shaped model: reconstruction, identity edits, batching, layers, bytes."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from editing.attention import attention_layer_names
from editing.configs import P2PConfig, PnPConfig
from editing.inversion import Inversion, InversionMismatch, invert
from editing.methods import METHODS, SourceGroup, Target, edit, edit_p2p, edit_pnp
from editing.sampling import denoise

from .conftest import STEPS, make_image

log = logging.getLogger(__name__)
TIGHT = (
    1e-7  # relative tolerance (max |dz| / max |z|) for "the same computation, batched differently"
)
RECON = 1e-8  # max |dz| of a reconstruction through STEPS chained steps, in fp64 (latents ~0.1)


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return _max_err(a, b) / float(b.abs().max())


def _processors(unet):
    return {k: id(v) for k, v in unet.attn_processors.items()}


@pytest.mark.parametrize(
    "config",
    [PnPConfig(target_correction=True, inject_uncond=False), P2PConfig(target_correction=True)],
    ids=["pnp", "p2p"],
)
def test_unchanged_prompt_reproduces_the_source(tiny, cat_inversion, config):
    """Direct Inversion: the source prompt as target gives back z_0 (and so the VAE round trip)."""
    [[res]] = edit(
        tiny, [SourceGroup(cat_inversion, [Target(cat_inversion.source_prompt, config)])]
    )
    di_err = _max_err(res.latent, cat_inversion.latents[0])
    plain = denoise(
        tiny, cat_inversion.latents[-1][None], [cat_inversion.source_prompt], num_steps=STEPS
    )
    ddim_err = _max_err(plain[0], cat_inversion.latents[0])
    log.info(
        "reconstruction max |dz|: direct inversion %.2e, plain DDIM (guidance 7.5) %.2e",
        di_err,
        ddim_err,
    )
    assert di_err < RECON
    assert ddim_err > 10 * di_err  # plain DDIM with guidance drifts; Direct Inversion does not


@pytest.mark.parametrize(
    "config", [PnPConfig(), P2PConfig(), PnPConfig(target_correction=False, inject_uncond=True)]
)
def test_a_different_prompt_changes_the_result(tiny, cat_inversion, config):
    [[res]] = edit(tiny, [SourceGroup(cat_inversion, [Target("a photo of a dog", config)])])
    assert _max_err(res.latent, cat_inversion.latents[0]) > 0.05


def test_pnp_without_injection_is_plain_denoising(tiny, cat_inversion):
    config = PnPConfig(feature_t=0.0, attn_t=0.0, target_correction=False)
    [[res]] = edit_pnp(tiny, [SourceGroup(cat_inversion, [Target("a photo of a dog", config)])])
    plain = denoise(tiny, cat_inversion.latents[-1][None], ["a photo of a dog"], num_steps=STEPS)
    assert _rel_err(res.latent, plain[0]) < TIGHT


@pytest.mark.parametrize("method", ["pnp", "p2p"])
def test_batched_targets_equal_single_edits(tiny, cat_inversion, method):
    cfg = PnPConfig() if method == "pnp" else P2PConfig()
    prompts = [
        "a photo of a dog",
        "a photo of a red cat",
        "a photo of a cat",
        "a photo of a turquoise cat",
    ]
    targets = [Target(p, cfg) for p in prompts]
    [batched] = METHODS[method].run(tiny, [SourceGroup(cat_inversion, targets)], max_batch=8)
    for t, b in zip(targets, batched):
        [[alone]] = METHODS[method].run(tiny, [SourceGroup(cat_inversion, [t])])
        assert _rel_err(b.latent, alone.latent) < TIGHT, t.prompt
    # chunking to max_batch=3 splits the group over two chunks with the same results
    chunked = METHODS[method].run(tiny, [SourceGroup(cat_inversion, targets)], max_batch=3)[0]
    for b, c in zip(batched, chunked):
        assert _rel_err(b.latent, c.latent) < TIGHT


def test_several_sources_share_a_batch(tiny, cat_inversion):
    other = invert(tiny, make_image(7), "a photo of a car", num_steps=STEPS)
    groups = [
        SourceGroup(
            cat_inversion,
            [Target("a photo of a dog", P2PConfig()), Target("a photo of a red cat", PnPConfig())],
        ),
        SourceGroup(
            other,
            [Target("a photo of a red car", P2PConfig()), Target("a photo of a car", PnPConfig())],
        ),
    ]
    together = edit(tiny, groups, max_batch=8)
    for g, res in zip(groups, together):
        alone = edit(tiny, [g], max_batch=8)[0]
        for a, b in zip(res, alone):
            assert _rel_err(a.latent, b.latent) < TIGHT
    assert [r.method for r in together[0]] == ["p2p", "pnp"]


def test_unet_evaluations_are_counted(tiny, cat_inversion):
    k = 4
    targets = [Target(f"a photo of a {w}", PnPConfig()) for w in ("dog", "car", "bag", "hat")]
    res = edit_pnp(tiny, [SourceGroup(cat_inversion, targets)])[0]
    assert cat_inversion.unet_evals == 3 * STEPS  # inversion T + Direct Inversion pass 2T
    for r in res:
        assert r.unet_evals == {"source": STEPS / k, "target": 2 * STEPS}


def test_determinism(tiny, cat_inversion):
    inv2 = invert(tiny, make_image(0), "a photo of a cat", num_steps=STEPS)
    assert torch.equal(inv2.latents, cat_inversion.latents)
    t = [Target("a photo of a dog", P2PConfig(), seed=3)]
    a = edit(tiny, [SourceGroup(cat_inversion, t)])[0][0]
    b = edit(tiny, [SourceGroup(inv2, t)])[0][0]
    assert torch.equal(a.latent, b.latent)
    assert list(a.image.getdata()) == list(b.image.getdata())


def test_controlled_layers_and_restoration(tiny, cat_inversion, monkeypatch):
    from editing import attention

    before = _processors(tiny.unet)
    seen = {}
    real = attention.controlled_unet

    def spy(unet, state, **kw):
        ctx = real(unet, state, **kw)

        class Wrap:
            def __enter__(self):
                names = ctx.__enter__()
                seen["names"], seen["state"] = list(names), state
                return names

            def __exit__(self, *exc):
                return ctx.__exit__(*exc)

        return Wrap()

    for module in ("editing.pnp", "editing.p2p"):
        monkeypatch.setattr(f"{module}.controlled_unet", spy)
    edit_pnp(tiny, [SourceGroup(cat_inversion, [Target("a photo of a dog", PnPConfig())])])
    sd_attn = [
        f"{p}.transformer_blocks.0.attn1"
        for p in (
            "up_blocks.1.attentions.1",
            "up_blocks.1.attentions.2",
            "up_blocks.2.attentions.0",
            "up_blocks.2.attentions.1",
            "up_blocks.2.attentions.2",
            "up_blocks.3.attentions.0",
            "up_blocks.3.attentions.1",
            "up_blocks.3.attentions.2",
        )
    ]
    assert seen["names"] == sd_attn + [
        "up_blocks.1.resnets.1"
    ]  # PnP's decoder layers 4-11 + layer-4 features
    assert seen["state"].outputs.acted == set(
        seen["names"]
    )  # and every one of them really injected
    assert (
        _processors(tiny.unet) == before
        and not tiny.unet.up_blocks[1].resnets[1].conv2._forward_hooks
    )

    edit_p2p(tiny, [SourceGroup(cat_inversion, [Target("a photo of a dog", P2PConfig())])])
    all_layers = attention_layer_names(tiny.unet)
    assert (
        seen["names"] == all_layers and len(all_layers) == 32
    )  # every layer has a P2P processor...
    cross = {n for n in all_layers if n.endswith("attn2")}
    latent = cat_inversion.latents.shape[-1] ** 2
    # ...cross-attention edited everywhere, self-attention only at <= 1/4 of the latent's positions
    low_res_self = {
        n
        for n in all_layers
        if n.endswith("attn1") and not n.startswith(("down_blocks.0", "up_blocks.3"))
    }
    assert seen["state"].outputs.acted == cross | low_res_self and latent == 64
    assert _processors(tiny.unet) == before


def test_unet_restored_after_an_exception(tiny, cat_inversion):
    before = _processors(tiny.unet)
    bad = PnPConfig(attn_layers=("up_blocks.1.attentions.1", "up_blocks.9.attentions.0"))
    with pytest.raises(ValueError, match="up_blocks.9"):
        edit_pnp(tiny, [SourceGroup(cat_inversion, [Target("a photo of a dog", bad)])])
    bad_feature = PnPConfig(feature_layers=("up_blocks.1.resnets.1", "up_blocks.1.nothing"))
    with pytest.raises(ValueError, match="nothing"):
        edit_pnp(tiny, [SourceGroup(cat_inversion, [Target("a photo of a dog", bad_feature)])])
    assert _processors(tiny.unet) == before
    assert all(not m._forward_hooks for m in tiny.unet.modules())


def test_inversion_bytes_round_trip_and_refusal(tiny, cat_inversion):
    blob = cat_inversion.to_bytes()
    back = Inversion.from_bytes(blob, expect={"num_steps": STEPS, "model_revision": tiny.revision})
    assert torch.equal(back.latents, cat_inversion.latents)
    assert torch.equal(back.corrections, cat_inversion.corrections)
    assert torch.equal(back.cond, cat_inversion.cond)
    assert back.facts == cat_inversion.facts and back.facts["height"] == 16
    with pytest.raises(InversionMismatch, match="num_steps"):
        Inversion.from_bytes(blob, expect={"num_steps": 50})
    with pytest.raises(InversionMismatch, match="model_id"):
        Inversion.from_bytes(blob, expect={"model_id": "runwayml/stable-diffusion-v1-5"})
    with pytest.raises(InversionMismatch, match="unreadable"):
        Inversion.from_bytes(blob[: len(blob) // 2])
    # the same edit from the loaded inversion
    t = [Target("a photo of a dog", PnPConfig())]
    a = edit(tiny, [SourceGroup(cat_inversion, t)])[0][0]
    b = edit(tiny, [SourceGroup(back, t)])[0][0]
    assert torch.equal(a.latent, b.latent)


def test_cached_pnp_features_replay_the_source_branch(tiny, cat_inversion):
    targets = [Target("a photo of a dog", PnPConfig()), Target("a photo of a red cat", PnPConfig())]
    live = edit_pnp(tiny, [SourceGroup(cat_inversion, targets)], record_features=True)[0]
    feats = live[0].features
    assert feats is not None and feats.nbytes > 0
    from editing.methods import PnPFeatures

    back = PnPFeatures.from_bytes(feats.to_bytes())
    replay = edit_pnp(tiny, [SourceGroup(cat_inversion, targets, features=back)])[0]
    for a, b in zip(live, replay):
        assert _rel_err(a.latent, b.latent) < 2e-3  # features are cached in fp16
        assert b.unet_evals["source"] == 0
    other = PnPConfig(attn_t=0.9)
    with pytest.raises(ValueError, match="do not cover"):
        edit_pnp(
            tiny, [SourceGroup(cat_inversion, [Target("a photo of a dog", other)], features=back)]
        )


def test_local_blend_keeps_the_outside_of_the_mask(tiny, dog_inversion):
    cfg = P2PConfig(
        blend_source_words=("dog",),
        blend_target_words=("cat",),
        blend_fraction=1.0,
        blend_threshold=0.99,
    )
    [[res]] = edit_p2p(
        tiny, [SourceGroup(dog_inversion, [Target("a photo of a cat on gray background", cfg)])]
    )
    same = (res.latent - dog_inversion.latents[0]).abs().amax(0) < RECON
    assert 0 < int(same.sum()) < same.numel()  # part of the latent kept exactly, part edited
    with pytest.raises(ValueError, match="not in the prompt"):
        bad = dataclasses.replace(cfg, blend_source_words=("horse",))
        edit_p2p(
            tiny, [SourceGroup(dog_inversion, [Target("a photo of a cat on gray background", bad)])]
        )


def test_local_blend_mask_is_the_union_of_thresholded_pooled_maps():
    from editing.methods import local_blend_mask

    src = torch.zeros(16, 1)
    src[0] = 1.0  # a peak at the top-left of a 4x4 map
    tgt = torch.zeros(16, 2)
    tgt[15, 0], tgt[15, 1] = 0.3, 0.3  # a two-token word peaking at the bottom-right
    mask = local_blend_mask(src, tgt, (8, 8), threshold=0.3)
    assert mask.shape == (1, 8, 8)
    m4 = mask[0, ::2, ::2]  # nearest upsampling: each map cell covers 2x2 latent positions
    expected = torch.zeros(4, 4)
    expected[:2, :2] = 1  # 3x3 max-pool spreads the source peak by one cell
    expected[2:, 2:] = 1  # and the target's
    assert torch.equal(m4, expected)
    assert torch.equal(
        local_blend_mask(src, tgt, (8, 8), threshold=0.999),
        local_blend_mask(src, tgt * 2, (8, 8), 0.999),
    )


def test_reweighting_changes_the_result_only_when_weighted(tiny, cat_inversion):
    src = cat_inversion.source_prompt
    [[plain]] = edit_p2p(tiny, [SourceGroup(cat_inversion, [Target(src, P2PConfig())])])
    [[heavy]] = edit_p2p(
        tiny, [SourceGroup(cat_inversion, [Target(src, P2PConfig(equalizer={"cat": 4.0}))])]
    )
    assert _max_err(plain.latent, heavy.latent) > 0.01


def test_word_swap_with_different_word_counts_is_refused(tiny, cat_inversion):
    with pytest.raises(ValueError, match="same number of words"):
        edit_p2p(
            tiny,
            [
                SourceGroup(
                    cat_inversion, [Target("a photo of a big cat", P2PConfig(kind="replace"))]
                )
            ],
        )


def test_config_type_must_match_method(tiny, cat_inversion):
    with pytest.raises(ValueError, match="needs PnPConfig"):
        edit_pnp(tiny, [SourceGroup(cat_inversion, [Target("a photo of a dog", P2PConfig())])])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_invariants_in_fp16_on_gpu(tiny_dir):
    from editing.model import load_model

    model = load_model(tiny_dir, device="cuda", dtype=torch.float16)
    inv = invert(model, make_image(0), "a photo of a cat", num_steps=STEPS)
    for cfg in (
        PnPConfig(target_correction=True, inject_uncond=False),
        P2PConfig(target_correction=True),
    ):
        [[same]] = edit(model, [SourceGroup(inv, [Target(inv.source_prompt, cfg)])])
        assert _max_err(same.latent, inv.latents[0].cpu()) < 5e-2  # fp16 UNet, fp32 latent math
        [[other]] = edit(model, [SourceGroup(inv, [Target("a photo of a dog", cfg)])])
        assert _max_err(other.latent, inv.latents[0].cpu()) > 0.05


def test_layers_may_be_given_as_parents_or_attention_paths(tiny):
    from editing.attention import self_attention_names

    by_parent = self_attention_names(tiny.unet, ("up_blocks.2.attentions.0",))
    by_path = self_attention_names(
        tiny.unet, ("up_blocks.2.attentions.0.transformer_blocks.0.attn1",)
    )
    assert by_parent == by_path == ["up_blocks.2.attentions.0.transformer_blocks.0.attn1"]
    with pytest.raises(ValueError, match="no self-attention layer"):
        self_attention_names(tiny.unet, ("up_blocks.2.attentions.0.transformer_blocks.0.attn2",))


def test_inverting_several_images_at_once_equals_one_by_one(tiny, cat_inversion):
    from editing.inversion import invert_many

    other = invert(tiny, make_image(7), "a photo of a car", num_steps=STEPS)
    both = invert_many(
        tiny,
        [make_image(0), make_image(7)],
        ["a photo of a cat", "a photo of a car"],
        num_steps=STEPS,
    )
    for alone, batched in zip((cat_inversion, other), both):
        assert _rel_err(batched.latents, alone.latents) < TIGHT
        assert _rel_err(batched.corrections, alone.corrections) < TIGHT
        assert batched.facts == alone.facts and batched.unet_evals == alone.unet_evals


def test_the_registry_has_one_method_per_config():
    from editing.configs import METHOD_CONFIGS
    from editing.methods import METHOD_OF_CONFIG

    assert list(METHODS) == list(METHOD_CONFIGS)
    assert METHOD_OF_CONFIG == {cls: name for name, cls in METHOD_CONFIGS.items()}
    assert METHODS["pnp"].options == {"record_features", "pad"} and METHODS["p2p"].options == {
        "pad"
    }
    with pytest.raises(TypeError, match="record_features"):  # a Plug-and-Play option only
        edit_p2p(None, [], record_features=True)


def test_edit_gives_options_and_features_to_the_methods_that_take_them(tiny, cat_inversion):
    pnp, p2p = Target("a photo of a dog", PnPConfig()), Target("a photo of a dog", P2PConfig())
    live = edit(tiny, [SourceGroup(cat_inversion, [pnp, p2p])], record_features=True)[0]
    assert live[0].features is not None and live[1].features is None
    # a group's cached features replay its PnP targets; its P2P targets run their source row as before
    warm = edit(tiny, [SourceGroup(cat_inversion, [pnp, p2p], features=live[0].features)])[0]
    assert warm[0].unet_evals["source"] == 0 and warm[1].unet_evals["source"] == STEPS
    assert torch.equal(warm[1].latent, live[1].latent)
