"""Plain (uncontrolled) DDIM sampling: text-to-image, and denoising a given z_T with a prompt.

Used as the "no control" baseline (inversion then the target prompt) and to measure prompt following.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from editing.attention import attention_layer_names
from editing.ddim import denoise_step, guide, make_schedule
from editing.model import EditModel


@torch.no_grad()
def denoise(
    model: EditModel,
    z_t: torch.Tensor,
    prompts: Sequence[str],
    *,
    num_steps: int = 50,
    guidance_scale: float = 7.5,
    negative_prompt: str = "",
) -> torch.Tensor:
    """Deterministic DDIM from the noisiest level: z_t (N, C, h, w) -> z_0, N prompts, CFG."""
    if len(prompts) != z_t.shape[0]:
        raise ValueError(f"{len(prompts)} prompts for {z_t.shape[0]} latents")
    if not attention_layer_names(model.unet):
        raise ValueError("this UNet has no attention layers")
    schedule = make_schedule(model.scheduler, num_steps)
    n = len(prompts)
    emb = torch.cat(
        [model.encode_prompts([negative_prompt] * n), model.encode_prompts(list(prompts))]
    )
    z = z_t.to(model.device, model.latent_dtype)
    for level in range(num_steps, 0, -1):
        x = torch.cat([z, z]).to(model.dtype)
        out = model.unet(
            x, schedule.timestep(level).to(model.device), encoder_hidden_states=emb
        ).sample
        z = denoise_step(guide(out[:n], out[n:], guidance_scale), z, schedule, level)
    return z


@torch.no_grad()
def generate(
    model: EditModel,
    prompts: Sequence[str],
    *,
    num_steps: int = 50,
    guidance_scale: float = 7.5,
    seed: int = 0,
    size: tuple[int, int] | None = None,
) -> list[Image.Image]:
    """Text-to-image with DDIM (eta 0); noise from a CPU `torch.Generator(seed)` for reproducibility."""
    w, h = size or (model.native_size, model.native_size)
    f = model.vae_scale_factor
    gen = torch.Generator("cpu").manual_seed(seed)
    channels = model.unet.config.in_channels
    noise = torch.randn((len(prompts), channels, h // f, w // f), generator=gen)
    return model.decode_latents(
        denoise(model, noise, prompts, num_steps=num_steps, guidance_scale=guidance_scale)
    )
