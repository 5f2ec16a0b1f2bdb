"""The forms a user's model comes in (editing.model_forms): hub ids from a simulated Hugging Face cache
(nothing downloads), single-file checkpoints and LoRA adapters, and the identity each gives the model."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from editing.configs import PnPConfig
from editing.inversion import inversion_facts, invert
from editing.methods import SourceGroup, Target, edit
from editing.model import load_model
from editing.model_forms import ModelNotCached, fetch, fetch_arguments, parse_lora

from .conftest import STEPS, make_image

COMMITS = ("a" * 40, "b" * 40)


def fake_hub_cache(root: Path, repo_id: str, model_dir: Path, commits=COMMITS) -> Path:
    """A Hugging Face cache holding `repo_id` at each commit (a copy of `model_dir`), refs/main at the
    last; the second commit's UNet is perturbed so that the snapshots differ."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    for i, commit in enumerate(commits):
        snap = repo / "snapshots" / commit
        shutil.copytree(model_dir, snap)
        if i:
            from safetensors.torch import load_file, save_file

            st = snap / "unet" / "diffusion_pytorch_model.safetensors"
            weights = load_file(st)
            weights["conv_out.bias"] = weights["conv_out.bias"] + 0.05
            save_file(weights, st)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commits[-1])
    return root


def make_lora(model_dir: Path, out: Path, *, rank: int = 2, seed: int = 0) -> Path:
    """A tiny LoRA for the model in `model_dir`: random A and B on the UNet's attention projections,
    saved with diffusers' LoRA writer."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    unet.add_adapter(
        LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    StableDiffusionPipeline.save_lora_weights(
        out, unet_lora_layers=get_peft_model_state_dict(unet), safe_serialization=True
    )
    return out / "pytorch_lora_weights.safetensors"


def pnp_edit(model) -> torch.Tensor:
    inv = invert(model, make_image(0), "a photo of a cat", num_steps=STEPS)
    [[res]] = edit(model, [SourceGroup(inv, [Target("a photo of a dog", PnPConfig(), seed=1)])])
    return torch.from_numpy(np.array(res.image)).float()


# ---------------------------------------------------------------- hub ids


@pytest.fixture
def hub_cache(tmp_path, tiny_dir, monkeypatch):
    root = fake_hub_cache(tmp_path / "hub", "acme/tiny-sd", tiny_dir)
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    return root


def test_hub_id_loads_from_the_cache_at_main_or_a_pinned_revision(hub_cache):
    main = load_model("acme/tiny-sd", dtype=torch.float64)
    assert main.revision == COMMITS[1]  # refs/main, resolved to its commit
    pinned = load_model("acme/tiny-sd", dtype=torch.float64, revision=COMMITS[0])
    assert pinned.revision == COMMITS[0]
    assert not torch.equal(main.unet.conv_out.bias, pinned.unet.conv_out.bias)
    # what the inversion cache key is made of records the commit
    facts = inversion_facts(pinned, "a photo of a cat")
    assert (
        facts["model_revision"]
        == COMMITS[0]
        != inversion_facts(main, "a photo of a cat")["model_revision"]
    )


def test_hub_id_missing_from_the_cache_says_how_to_fetch_it(hub_cache):
    with pytest.raises(
        ModelNotCached, match=r"add --download to fetch it once.*hf download acme/other"
    ):
        load_model("acme/other")
    with pytest.raises(ModelNotCached, match=f"--revision {'c' * 40}"):
        load_model("acme/tiny-sd", revision="c" * 40)


def test_fetch_arguments_leave_pickles_out_unless_allowed():
    args = fetch_arguments("acme/sd", "abc123", allow_pickle=False)
    assert args["repo_id"] == "acme/sd" and args["revision"] == "abc123"
    assert "*/*.safetensors" in args["allow_patterns"]
    assert not any(p.endswith((".bin", ".ckpt", ".pt", ".pth")) for p in args["allow_patterns"])
    assert "safety_checker/*" in args["ignore_patterns"]
    allowed = fetch_arguments("acme/sd", None, allow_pickle=True)["allow_patterns"]
    assert "*/*.bin" in allowed and "*/*.ckpt" in allowed


def test_fetch_offline_is_one_clear_error(hub_cache, monkeypatch):
    import huggingface_hub.constants as hc

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match=r"could not download 'acme/other' at revision v1 into"):
        fetch("acme/other", "v1", allow_pickle=False)
    with pytest.raises(ValueError, match="could not download 'acme/other'"):
        load_model("acme/other", local_files_only=False)


# ---------------------------------------------------------------- LoRA


@pytest.mark.parametrize(
    "text,source,scale",
    [("style.safetensors", "style.safetensors", 1.0), ("acme/style@0.5", "acme/style", 0.5),
     ("a@b/x.safetensors@-1", "a@b/x.safetensors", -1.0), ("a@b", "a@b", 1.0)],
)  # fmt: skip
def test_parse_lora(text, source, scale):
    spec = parse_lora(text)
    assert (spec.source, spec.scale) == (source, scale)


@pytest.mark.parametrize("text", ["@0.5", "x@nan", "x@1e9"])
def test_parse_lora_refuses(text):
    with pytest.raises(ValueError, match="--lora"):
        parse_lora(text)


@pytest.fixture(scope="module")
def tiny_lora(tiny_dir, tmp_path_factory):
    return make_lora(tiny_dir, tmp_path_factory.mktemp("lora"))


def test_lora_scale_changes_the_edit_and_scale_zero_is_no_lora(tiny, tiny_dir, tiny_lora):
    plain = pnp_edit(tiny)
    zero = load_model(tiny_dir, dtype=torch.float64, loras=[f"{tiny_lora}@0"])
    half = load_model(tiny_dir, dtype=torch.float64, loras=[f"{tiny_lora}@0.5"])
    full = load_model(tiny_dir, dtype=torch.float64, loras=[str(tiny_lora)])
    for name, p in tiny.unet.named_parameters():  # fused: the same plain layers, base weights at 0
        assert torch.equal(p, dict(zero.unet.named_parameters())[name])
    assert torch.equal(pnp_edit(zero), plain)
    e_half, e_full = pnp_edit(half), pnp_edit(full)
    assert not torch.equal(e_half, plain) and not torch.equal(e_full, e_half)
    # the adapter and its scale are part of the identity (sidecars, inversion cache key)
    revs = {tiny.revision, zero.revision, half.revision, full.revision}
    assert len(revs) == 4 and half.revision.startswith(tiny.revision + "+lora-")
    assert half.revision.endswith("@0.5") and full.revision.endswith("@1")


def test_lora_from_a_cached_hub_id(tiny_dir, tiny_lora, tmp_path, monkeypatch):
    repo = tmp_path / "hub" / "models--acme--style"
    (repo / "snapshots" / COMMITS[0]).mkdir(parents=True)
    shutil.copy(tiny_lora, repo / "snapshots" / COMMITS[0])
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMITS[0])
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    by_id = load_model(tiny_dir, dtype=torch.float64, loras=["acme/style@0.5"])
    by_file = load_model(tiny_dir, dtype=torch.float64, loras=[f"{tiny_lora}@0.5"])
    assert by_id.revision == by_file.revision
    assert torch.equal(by_id.unet.conv_in.weight, by_file.unet.conv_in.weight)


# ---------------------------------------------------------------- single files

_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
           ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))  # fmt: skip
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}  # fmt: skip


def _ldm_unet_key(key: str, lpb: int, up_attn: set[int]) -> str:
    """A diffusers UNet key in the original (LDM) layout: the inverse of what diffusers' single-file
    loader maps, for SD 1.x-shaped UNets with `lpb` layers per block."""
    head, _, leaf = key.rpartition(".")
    if head in _UNET_TOP:
        return f"{_UNET_TOP[head]}.{leaf}"
    parts = key.split(".")

    def resnet(tail: str) -> str:
        name, _, leaf = tail.partition(".")
        return dict(_RESNET).get(name, name) + "." + leaf

    if parts[0] == "mid_block":
        kind, k, tail = parts[1], int(parts[2]), ".".join(parts[3:])
        return (
            f"middle_block.{2 * k}.{resnet(tail)}"
            if kind == "resnets"
            else f"middle_block.1.{tail}"
        )
    block, kind, k, tail = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
    if parts[0] == "down_blocks":
        if kind == "downsamplers":
            return f"input_blocks.{1 + block * (lpb + 1) + lpb}.0.op.{tail.removeprefix('conv.')}"
        i = 1 + block * (lpb + 1) + k
        return (
            f"input_blocks.{i}.0.{resnet(tail)}"
            if kind == "resnets"
            else f"input_blocks.{i}.1.{tail}"
        )
    if kind == "upsamplers":
        return f"output_blocks.{block * (lpb + 1) + lpb}.{2 if block in up_attn else 1}.{tail}"
    i = block * (lpb + 1) + k
    return (
        f"output_blocks.{i}.0.{resnet(tail)}"
        if kind == "resnets"
        else f"output_blocks.{i}.1.{tail}"
    )


def _ldm_vae_key(key: str, n_up: int) -> str:
    """A diffusers VAE key in the original layout (the inverse of diffusers' single-file mapping)."""
    key = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
    parts = key.split(".")
    if len(parts) > 3 and parts[1] in ("down_blocks", "up_blocks", "mid_block"):
        side, kind = parts[0], parts[1]
        if kind == "mid_block":
            return f"{side}.mid.block_{int(parts[3]) + 1}." + ".".join(parts[4:])
        i, sub, tail = int(parts[2]), parts[3], ".".join(parts[5:])
        if kind == "down_blocks":
            pre = f"{side}.down.{i}"
            return (
                f"{pre}.block.{parts[4]}.{tail}" if sub == "resnets" else f"{pre}.downsample.{tail}"
            )
        pre = f"{side}.up.{n_up - 1 - i}"
        return f"{pre}.block.{parts[4]}.{tail}" if sub == "resnets" else f"{pre}.upsample.{tail}"
    return key


def save_single_file(model_dir: Path, path: Path) -> Path:
    """The diffusers folder `model_dir` written as one original-layout SD checkpoint (safetensors)."""
    import json

    from safetensors.torch import load_file, save_file

    unet_cfg = json.loads((model_dir / "unet" / "config.json").read_text())
    vae_cfg = json.loads((model_dir / "vae" / "config.json").read_text())
    lpb = unet_cfg["layers_per_block"]
    up_attn = {i for i, t in enumerate(unet_cfg["up_block_types"]) if "CrossAttn" in t}
    unet = load_file(model_dir / "unet" / "diffusion_pytorch_model.safetensors")
    vae = load_file(model_dir / "vae" / "diffusion_pytorch_model.safetensors")
    text = load_file(model_dir / "text_encoder" / "model.safetensors")
    n_up = len(vae_cfg["up_block_types"])
    out = {"model.diffusion_model." + _ldm_unet_key(k, lpb, up_attn): v for k, v in unet.items()}
    out |= {"first_stage_model." + _ldm_vae_key(k, n_up): v for k, v in vae.items()}
    # the original layout's text encoder keys start text_model. (transformers 5 saves them without it)
    out |= {"cond_stage_model.transformer." + ("" if k.startswith("text_model.") else "text_model.") + k: v
            for k, v in text.items()}  # fmt: skip
    save_file({k: v.contiguous() for k, v in out.items()}, path)
    return path


def test_single_file_loads_and_edits_like_the_folder(tmp_path):
    from refmodel import REFERENCE_MODEL_DIR

    folder = Path(REFERENCE_MODEL_DIR)
    single = save_single_file(folder, tmp_path / "shapes-v2.safetensors")
    by_folder = load_model(folder, dtype=torch.float64)
    by_file = load_model(single, dtype=torch.float64, config=folder)
    for part in ("unet", "vae", "text_encoder"):
        a, b = getattr(by_folder, part).state_dict(), getattr(by_file, part).state_dict()
        assert a.keys() == b.keys(), part
        assert all(torch.equal(a[k], b[k]) for k in a), part
    assert torch.equal(pnp_edit(by_folder), pnp_edit(by_file))
    # fp16: the VAE is loaded in its own precision (fp32, force_upcast), not upcast from fp16
    half = load_model(single, device="cpu", dtype=torch.float16, config=folder)
    assert half.unet.dtype == torch.float16 and half.vae.dtype == torch.float32
    vae32 = load_model(folder, device="cpu", dtype=torch.float16).vae.state_dict()
    assert all(torch.equal(v, vae32[k]) for k, v in half.vae.state_dict().items())
    # the identity is the file's content hash: another file's bytes, another revision
    assert by_file.revision.startswith("sha256-") and by_file.revision != by_folder.revision
    other = tmp_path / "other.safetensors"
    from safetensors.torch import load_file, save_file

    weights = load_file(single)
    weights["model.diffusion_model.out.2.bias"] += 0.01
    save_file(weights, other)
    assert load_model(other, config=folder).revision != by_file.revision
