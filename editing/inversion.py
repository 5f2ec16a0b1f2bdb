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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from editing.ddim import Schedule, denoise_step, guide, invert_step, make_schedule
from editing.model import SIZE_RULE, EditModel, padded_rows

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
        "size_rule": SIZE_RULE,
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
    corrections: (
        torch.Tensor
    )  # (T, C, h, w) fp32; corrections[k-1] = d_k, added after the step k -> k-1
    cond: torch.Tensor  # (L, D) source prompt embedding
    uncond: torch.Tensor  # (L, D) empty prompt embedding
    facts: dict[str, Any]  # inversion_facts(...) plus image size
    unet_evals: int = 0  # UNet image-evaluations spent computing it (0 when loaded from bytes)
    seconds: float = 0.0

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
            raise InversionMismatch(
                f"unreadable inversion blob ({type(exc).__name__}: {exc})"
            ) from exc
        if facts.get("format") != FORMAT_VERSION:
            raise InversionMismatch(
                f"inversion format {facts.get('format')!r}, expected {FORMAT_VERSION!r}"
            )
        if expect:
            diff = {k: (facts.get(k), v) for k, v in expect.items() if facts.get(k) != v}
            if diff:
                desc = "; ".join(
                    f"{k}: blob has {a!r}, wanted {b!r}" for k, (a, b) in sorted(diff.items())
                )
                raise InversionMismatch(f"inversion was made for other facts: {desc}")
        inv = cls(
            latents=tensors["latents"],
            corrections=tensors["corrections"],
            cond=tensors["cond"],
            uncond=tensors["uncond"],
            facts=facts,
        )
        if inv.latents.shape[0] != inv.corrections.shape[0] + 1 or inv.num_steps != facts.get(
            "num_steps"
        ):
            raise InversionMismatch(
                "inversion blob is inconsistent: trajectory and corrections lengths differ"
            )
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
    facts: Mapping[str, Any] | None = None,
) -> Inversion:
    """DDIM inversion (guidance 1) of `image` under `source_prompt`, then the Direct Inversion pass.

    Costs num_steps UNet evaluations for the inversion and 2 * num_steps for the guided source pass.
    `guidance_scale` is the source branch's guidance (the corrections are exact for it). `facts`: the
    :func:`inversion_facts` of these arguments when the caller has them already (a cache key's).
    """
    [inv] = invert_many(
        model,
        [image],
        [source_prompt],
        num_steps=num_steps,
        guidance_scale=guidance_scale,
        size_policy=size_policy,
        facts=None if facts is None else [facts],
    )
    return inv


@torch.no_grad()
def invert_many(
    model: EditModel,
    images: list[Image.Image],
    source_prompts: list[str],
    *,
    num_steps: int = 50,
    guidance_scale: float = 7.5,
    size_policy: str = "fit",
    max_batch: int = 16,
    facts: Sequence[Mapping[str, Any]] | None = None,
    pad: bool | None = None,
) -> list[Inversion]:
    """:func:`invert` for several images at once: images of the same size share every UNet call
    (up to `max_batch` images per call). Results are identical to inverting each alone. `facts`: each
    image's :func:`inversion_facts` when the caller has them already (computed here otherwise). `pad`:
    run each call at a fixed batch shape (images padded to a power of two by repeating the last; the
    copies are discarded); None: padded when the model's UNet is compiled (the editing chunks' rule)."""
    if len(images) != len(source_prompts):
        raise ValueError(f"{len(images)} images for {len(source_prompts)} source prompts")
    if pad is None:
        pad = model.compiled != "off"
    if facts is None:
        facts = [
            inversion_facts(model, p, num_steps=num_steps, guidance_scale=guidance_scale,
                            size_policy=size_policy)
            for p in source_prompts
        ]  # fmt: skip
    elif len(facts) != len(images):
        raise ValueError(f"{len(images)} images for {len(facts)} facts")
    # 1. Validate and prepare
    start = time.perf_counter()
    schedule = make_schedule(model.scheduler, num_steps)
    pixels = [model.prepare_image(img, size_policy) for img in images]
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, px in enumerate(pixels):
        by_shape.setdefault(tuple(px.shape), []).append(i)
    out: list[Inversion | None] = [None] * len(images)
    for idxs in by_shape.values():
        for b in range(0, len(idxs), max_batch):
            part = idxs[b : b + max_batch]
            invs = _invert_batch(
                model,
                schedule,
                torch.cat([pixels[i] for i in part]),
                [source_prompts[i] for i in part],
                guidance_scale,
                pad,
            )
            for i, inv in zip(part, invs):
                inv.facts = dict(facts[i]) | {
                    "height": int(pixels[i].shape[2]),
                    "width": int(pixels[i].shape[3]),
                }
                out[i] = inv
    seconds = (time.perf_counter() - start) / max(1, len(images))
    for inv in out:
        inv.seconds = seconds
    return out  # type: ignore[return-value]


def _invert_batch(
    model: EditModel,
    schedule: Schedule,
    pixels: torch.Tensor,
    prompts: list[str],
    guidance_scale: float,
    pad: bool = False,
) -> list[Inversion]:
    n, steps = pixels.shape[0], schedule.num_steps
    # 2. Encode prompts and the images (padding: the last image again, up to a fixed batch shape)
    emb = model.encode_prompts([""] * n + prompts)
    uncond, cond = emb[:n], emb[n:]
    z = model.encode_image(pixels)  # (n, C, h, w) fp32 (fp64 for fp64 models)
    _check_finite("the image latent", z)
    extra = padded_rows(n) - n if pad else 0
    if extra:
        uncond, cond, z = (
            torch.cat([t, t[-1:].expand(extra, *t.shape[1:])]) for t in (uncond, cond, z)
        )
        n += extra
    timesteps = schedule.timesteps_on(model.device)  # once; indexed on the device per step
    # 3. Invert: z_0 -> z_T with the source prompt, guidance 1
    latents = [z]
    for level in range(1, steps + 1):
        out = model.unet(z.to(model.dtype), timesteps[level - 1], encoder_hidden_states=cond).sample
        z = invert_step(out, z, schedule, level)
        latents.append(z)
    traj = torch.stack(latents, 1)  # (n, T+1, C, h, w)
    _check_finite("the inverted trajectory", traj)
    # 4. Direct Inversion: one guided pass of the source branch along the trajectory, recording the gaps
    gaps = torch.empty_like(traj[:, 1:])
    for level in range(steps, 0, -1):
        x = traj[:, level]
        out = model.unet(torch.cat([x, x]).to(model.dtype), timesteps[level - 1],
                         encoder_hidden_states=torch.cat([uncond, cond])).sample  # fmt: skip
        produced = denoise_step(guide(out[:n], out[n:], guidance_scale), x, schedule, level)
        gaps[:, level - 1] = traj[:, level - 1] - produced
    _check_finite("the Direct Inversion corrections", gaps)
    n -= extra
    return [
        Inversion(
            latents=traj[i].cpu(),
            corrections=gaps[i].cpu(),
            cond=cond[i].to(model.latent_dtype).cpu(),
            uncond=uncond[i].to(model.latent_dtype).cpu(),
            facts={},
            unet_evals=3 * steps,
        )
        for i in range(n)
    ]
