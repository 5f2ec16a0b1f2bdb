"""Small SD-shaped pipelines with random weights, built from configs: for tests, benchmarks and debugging.

They are saved as ordinary diffusers folders (safetensors) and loaded through exactly the same code path
as a real Stable Diffusion checkpoint. Nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from refmodel.tokenizer import write_tokenizer_files

TOY_WORDS = [
    "a", "an", "photo", "of", "the", "cat", "dog", "red", "blue", "green", "car", "bag", "leather", "denim",
    "on", "gray", "background", "turquoise", "circle", "square", "in", "watercolor", "style", "big", "small",
    "with", "hat", "sitting", "street", "crowded", "yellow", "purple", "triangle", "white", "black", "shape",
]  # fmt: skip


@dataclass(frozen=True)
class ToySpec:
    """Sizes of a toy SD-shaped model. `levels` UNet levels, SD's block types (attention in all but the
    deepest down block and the first up block)."""

    unet_channels: tuple[int, ...] = (32, 32, 32, 32)
    layers_per_block: int = 2
    latent_size: int = 8
    vae_channels: tuple[int, ...] = (16, 16)
    text_dim: int = 32
    text_layers: int = 2
    heads: int = 4
    norm_groups: int = 8
    prediction_type: str = "epsilon"


TINY = ToySpec()
# Compute-heavy enough that model time dominates a CPU benchmark (SD-shaped, scaled down).
BENCH = ToySpec(
    unet_channels=(64, 128, 128, 128),
    latent_size=16,
    vae_channels=(32, 64),
    text_dim=64,
    norm_groups=32,
)


def build_toy_pipeline(
    folder: str | Path, spec: ToySpec = TINY, *, seed: int = 0, words: list[str] | None = None
) -> Path:
    """Write a random-weight SD-shaped pipeline folder (safetensors) and return its path."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    tok_dir = write_tokenizer_files(folder / "_tokenizer_src", words or TOY_WORDS)
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir))
    torch.manual_seed(seed)
    n = len(spec.unet_channels)
    unet = UNet2DConditionModel(
        sample_size=spec.latent_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=spec.unet_channels,
        layers_per_block=spec.layers_per_block,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        cross_attention_dim=spec.text_dim,
        attention_head_dim=spec.unet_channels[0] // spec.heads,
        norm_num_groups=spec.norm_groups,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(spec.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(spec.vae_channels),
        block_out_channels=spec.vae_channels,
        latent_channels=4,
        norm_num_groups=min(spec.norm_groups, spec.vae_channels[0]),
        sample_size=spec.latent_size * 2 ** (len(spec.vae_channels) - 1),
    )
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=spec.text_dim,
            intermediate_size=spec.text_dim * 2,
            num_hidden_layers=spec.text_layers,
            num_attention_heads=spec.heads,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=spec.prediction_type,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder
