"""DDIM inversion plus Direct Inversion corrections (Ju et al. 2023, "PnP Inversion"), and its bytes form.

An :class:`Inversion` holds the latent trajectory z_0..z_T of a real image under its source prompt, the
per-step corrections d_k = z*_{k-1} - z~_{k-1} between that trajectory and one guided denoising pass of
the source branch, the source prompt's embeddings, and the facts it depends on. It serialises to
safetensors bytes so the pipeline can cache it; a blob made for other facts is refused.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from editing.ddim import Schedule, denoise_step, guide, invert_step, make_schedule
from editing.model import EditModel

logger = logging.getLogger(__name__)

FORMAT_VERSION = "editflow-inversion-1"


class InversionMismatch(ValueError):
    """A serialised inversion was made for other facts (model, steps, prompt, format...)."""


class NonFiniteError(FloatingPointError):
    """Inversion or editing produced NaN/inf (typically fp16 overflow)."""


def inversion_facts(
    model: EditModel,
    source_prompt: str,
    *,
    num_steps: int = 50,
    guidance_scale: float = 7.5,
    size_policy: str = "fit",
) -> dict[str, Any]:
    """What an inversion depends on apart from the image itself (a cache key adds the image's hash)."""
    return {
        "format": FORMAT_VERSION,
        "model_id": model.model_id,
        "model_revision": model.revision,
        "scheduler": model.scheduler_facts(),
        "num_steps": int(num_steps),
        "guidance_scale": float(guidance_scale),
        "size_policy": size_policy,
        "source_prompt": source_prompt,
    }


def _check_finite(name: str, t: torch.Tensor) -> None:
    if not torch.isfinite(t).all():
        raise NonFiniteError(
            f"{name} has non-finite values (NaN/inf); in fp16 this is a known overflow: invert in fp32 "
            "(load_model(..., dtype=torch.float32))"
        )


@dataclass
class Inversion:
    """A real image's DDIM trajectory under its source prompt, with Direct Inversion corrections."""

    latents: torch.Tensor  # (T+1, C, h, w) fp32 (fp64 for fp64 models); latents[k] = z*_k, latents[0] = VAE latent of the image
    corrections: torch.Tensor  # (T, C, h, w) fp32; corrections[k-1] = d_k, added after the step k -> k-1
    cond: torch.Tensor  # (L, D) source prompt embedding
    uncond: torch.Tensor  # (L, D) empty prompt embedding
    facts: dict[str, Any]  # inversion_facts(...) plus image size
    unet_evals: int = 0  # UNet image-evaluations spent computing it (0 when loaded from bytes)
    seconds: float = 0.0
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def num_steps(self) -> int:
        return int(self.corrections.shape[0])

    @property
    def source_prompt(self) -> str:
        return str(self.facts["source_prompt"])

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.latents.shape[1:])

    def to_bytes(self) -> bytes:
        tensors = {
            "latents": self.latents.contiguous().cpu(),
            "corrections": self.corrections.contiguous().cpu(),
            "cond": self.cond.contiguous().cpu(),
            "uncond": self.uncond.contiguous().cpu(),
        }
        return st_save(tensors, metadata={"facts": json.dumps(self.facts, sort_keys=True)})

    @classmethod
    def from_bytes(cls, data: bytes, expect: Mapping[str, Any] | None = None) -> Inversion:
        """Load bytes from :meth:`to_bytes`; refuse them if any fact in `expect` differs."""
        try:
            tensors = st_load(data)
            facts = json.loads(_read_metadata(data)["facts"])
        except Exception as exc:  # noqa: BLE001 - any decoding problem means "unreadable"
            raise InversionMismatch(f"unreadable inversion blob ({type(exc).__name__}: {exc})") from exc
        if facts.get("format") != FORMAT_VERSION:
            raise InversionMismatch(f"inversion format {facts.get('format')!r}, expected {FORMAT_VERSION!r}")
        if expect:
            diff = {k: (facts.get(k), v) for k, v in expect.items() if facts.get(k) != v}
            if diff:
                desc = "; ".join(f"{k}: blob has {a!r}, wanted {b!r}" for k, (a, b) in sorted(diff.items()))
                raise InversionMismatch(f"inversion was made for other facts: {desc}")
        inv = cls(
            latents=tensors["latents"],
            corrections=tensors["corrections"],
            cond=tensors["cond"],
            uncond=tensors["uncond"],
            facts=facts,
        )
        if inv.latents.shape[0] != inv.corrections.shape[0] + 1 or inv.num_steps != facts.get("num_steps"):
            raise InversionMismatch("inversion blob is inconsistent: trajectory and corrections lengths differ")
        return inv


def _read_metadata(data: bytes) -> dict[str, str]:
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    return header.get("__metadata__", {})


@torch.no_grad()
def invert(
    model: EditModel,
    image: Image.Image,
    source_prompt: str,
    *,
    num_steps: int = 50,
    guidance_scale: float = 7.5,
    size_policy: str = "fit",
) -> Inversion:
    """DDIM inversion (guidance 1) of `image` under `source_prompt`, then the Direct Inversion pass.

    Costs num_steps UNet evaluations for the inversion and 2 * num_steps for the guided source pass.
    `guidance_scale` is the source branch's guidance (the corrections are exact for it).
    """
    # 1. Validate and prepare
    start = time.perf_counter()
    facts = inversion_facts(
        model, source_prompt, num_steps=num_steps, guidance_scale=guidance_scale, size_policy=size_policy
    )
    schedule = make_schedule(model.scheduler, num_steps)
    pixels = model.prepare_image(image, size_policy)
    facts["height"], facts["width"] = int(pixels.shape[2]), int(pixels.shape[3])
    # 2. Encode prompts and the image
    uncond, cond = model.encode_prompts(["", source_prompt])
    z = model.encode_image(pixels)  # (1, C, h, w) fp32
    _check_finite("the image latent", z)
    # 3. Invert: z_0 -> z_T with the source prompt, guidance 1
    latents = [z[0]]
    for level in range(1, num_steps + 1):
        out = model.unet(z.to(model.dtype), schedule.timestep(level).to(model.device), encoder_hidden_states=cond[None]).sample
        z = invert_step(out, z, schedule, level)
        latents.append(z[0])
    traj = torch.stack(latents)  # (T+1, C, h, w)
    _check_finite("the inverted trajectory", traj)
    # 4. Direct Inversion: one guided pass of the source branch along the trajectory, recording the gaps
    corrections = _direct_inversion_gaps(model, schedule, traj, uncond, cond, guidance_scale)
    _check_finite("the Direct Inversion corrections", corrections)
    inv = Inversion(
        latents=traj.cpu(),
        corrections=corrections.cpu(),
        cond=cond.to(model.latent_dtype).cpu(),
        uncond=uncond.to(model.latent_dtype).cpu(),
        facts=facts,
        unet_evals=3 * num_steps,
        seconds=time.perf_counter() - start,
    )
    logger.debug("inverted %r in %.2fs", source_prompt, inv.seconds)
    return inv


def _direct_inversion_gaps(
    model: EditModel,
    schedule: Schedule,
    traj: torch.Tensor,
    uncond: torch.Tensor,
    cond: torch.Tensor,
    guidance_scale: float,
) -> torch.Tensor:
    emb = torch.stack([uncond, cond])
    gaps = torch.empty_like(traj[1:])
    for level in range(schedule.num_steps, 0, -1):
        x = traj[level][None].expand(2, -1, -1, -1)
        out = model.unet(x.to(model.dtype), schedule.timestep(level).to(model.device), encoder_hidden_states=emb).sample
        guided = guide(out[:1], out[1:], guidance_scale)
        produced = denoise_step(guided, traj[level][None], schedule, level)
        gaps[level - 1] = traj[level - 1] - produced[0]
    return gaps
