"""Builders for the reference model's parts: SD-shaped VAE, UNet, CLIP text encoder, schedulers.

Sizes are small so the whole model trains from scratch on two CPU cores; the block structure
is Stable Diffusion's, so Plug-and-Play's default layer names (``up_blocks.1.resnets.1`` and
the decoder self-attentions) exist.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from refmodel.domain import IMAGE_SIZE


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of the reference model (all sizes chosen for ~0.5 s/step on 2 cores)."""

    latent_channels: int = 4  # as in SD
    vae_channels: tuple[int, ...] = (32, 64)  # 2 levels: 32x32 image -> 16x16 latent
    vae_groups: int = 16  # GroupNorm groups; must divide every VAE channel count
    unet_channels: tuple[int, int, int, int] = (16, 32, 64, 64)  # 16x16, 8x8, 4x4, 2x2 levels
    unet_heads: tuple[int, int, int, int] = (2, 4, 4, 4)  # attention heads per level
    unet_groups: int = 8  # GroupNorm groups; must divide every UNet channel count
    text_hidden: int = 64  # CLIP hidden size = UNet cross_attention_dim
    text_intermediate: int = 256  # CLIP MLP width (4x hidden, as in CLIP)
    text_layers: int = 3  # CLIP transformer layers
    text_heads: int = 4  # CLIP attention heads
    text_embedding_std: float = 0.5  # token-embedding init; CLIP's 0.02 leaves prompts alike

    def __post_init__(self) -> None:
        if any(c % self.vae_groups for c in self.vae_channels):
            raise ValueError(f"vae_groups={self.vae_groups} must divide {self.vae_channels}")
        if any(c % self.unet_groups for c in self.unet_channels):
            raise ValueError(f"unet_groups={self.unet_groups} must divide {self.unet_channels}")
        if any(c % h for c, h in zip(self.unet_channels, self.unet_heads, strict=True)):
            raise ValueError(f"heads {self.unet_heads} must divide channels {self.unet_channels}")
        if self.text_hidden % self.text_heads:
            raise ValueError(f"text_heads={self.text_heads} must divide {self.text_hidden}")

    @property
    def latent_size(self) -> int:
        """Latent side length in pixels of the latent grid."""
        return IMAGE_SIZE // 2 ** (len(self.vae_channels) - 1)


# SD 1.x noise schedule.
SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "prediction_type": "epsilon",
}


def build_vae(cfg: ModelConfig) -> AutoencoderKL:
    """A 2-level KL autoencoder (downsample factor 2), no mid-block attention."""
    n = len(cfg.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.vae_channels,
        layers_per_block=1,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.vae_groups,
        sample_size=IMAGE_SIZE,
        mid_block_add_attention=False,
    )


def build_unet(cfg: ModelConfig) -> UNet2DConditionModel:
    """A UNet with SD 1.x's block layout (3 cross-attention levels + 1 plain, 2 layers each)."""
    return UNet2DConditionModel(
        sample_size=cfg.latent_size,
        in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels,
        down_block_types=(
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        up_block_types=(
            "UpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
        ),
        block_out_channels=cfg.unet_channels,
        layers_per_block=2,
        cross_attention_dim=cfg.text_hidden,
        attention_head_dim=cfg.unet_heads,  # diffusers' legacy name: the number of heads
        norm_num_groups=cfg.unet_groups,
    )


def build_text_encoder(cfg: ModelConfig, tokenizer: CLIPTokenizer) -> CLIPTextModel:
    """A small CLIP text transformer whose special ids match `tokenizer`."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.text_hidden,
        intermediate_size=cfg.text_intermediate,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=cfg.text_hidden,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = CLIPTextModel(config)
    torch.nn.init.normal_(model.get_input_embeddings().weight, std=cfg.text_embedding_std)
    return model


def build_train_scheduler() -> DDPMScheduler:
    """SD's training noise schedule."""
    return DDPMScheduler(**SCHEDULE)


def build_sample_scheduler() -> DDIMScheduler:
    """SD's DDIM sampler configuration for the same betas."""
    return DDIMScheduler(**SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
