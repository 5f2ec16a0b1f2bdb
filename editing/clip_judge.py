"""Edit QA's optional second judge: CLIP directional similarity (Gal et al. 2022, "StyleGAN-NADA"; the
edit-direction score of InstructPix2Pix's evaluation).

The edit's direction in CLIP's image space (edited image embedding minus source image embedding) is
compared by cosine with the direction from the source prompt's to the target prompt's text embedding:
near 1 when the image changed the way the prompts did, near 0 or below when it did not change or changed
some other way. The model is any ``transformers.CLIPModel`` with its processor (a hub id or a local
folder), loaded once per process by :func:`load_clip`.

    judge = load_clip("openai/clip-vit-base-patch32")          # or a local folder
    scores = clip_directional(judge, sources, edits, source_prompts, target_prompts)  # floats

torch + transformers + PIL only (no Prefect, no storage): usable from a notebook.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

__all__ = ["ClipJudge", "clip_directional", "load_clip"]


@dataclass(frozen=True)
class ClipJudge:
    """A CLIP model and its processor, in eval mode on one device."""

    model: Any  # transformers.CLIPModel
    processor: Any  # transformers.CLIPProcessor (tokenizer + image processor)
    ref: str  # what it was loaded from (hub id or folder), for the sidecar
    device: torch.device


@functools.lru_cache(maxsize=2)
def load_clip(ref: str, device: str = "cpu") -> ClipJudge:
    """The CLIP model and processor at `ref` (a hub id or a folder), once per process and device; a
    clear ``ValueError`` when `ref` holds no CLIP model."""
    from transformers import CLIPModel, CLIPProcessor

    try:
        model = CLIPModel.from_pretrained(ref)
        processor = CLIPProcessor.from_pretrained(ref)
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"--qa-model {ref!r}: cannot load a CLIP model and processor: {exc}"
        ) from exc
    dev = torch.device(device)
    return ClipJudge(model.to(dev).eval(), processor, ref, dev)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _features(out: Any) -> torch.Tensor:
    """The projected embeddings from get_*_features (a tensor, or an output with ``pooler_output``)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@torch.no_grad()
def clip_directional(
    judge: ClipJudge,
    sources: Sequence[Image.Image],
    edits: Sequence[Image.Image],
    source_prompts: Sequence[str],
    target_prompts: Sequence[str],
    *,
    max_batch: int = 64,
) -> list[float]:
    """Per edit, cos(E(edit) - E(source), T(target prompt) - T(source prompt)) with CLIP's unit-normed
    image embeddings E and text embeddings T, in [-1, 1]; NaN where a direction is zero (an edit that
    is its source, or a target prompt that is its source prompt)."""
    # 1. Validate
    n = len(edits)
    if not (len(sources) == len(source_prompts) == len(target_prompts) == n):
        raise ValueError(
            f"{n} edits for {len(sources)} sources, {len(source_prompts)} source and "
            f"{len(target_prompts)} target prompts"
        )
    if not n:
        return []
    # 2. Embed each distinct prompt and every image, in batches of max_batch
    prompts = list(dict.fromkeys([*source_prompts, *target_prompts]))
    text = torch.cat([
        _features(judge.model.get_text_features(**judge.processor(
            text=prompts[b : b + max_batch], return_tensors="pt", padding=True, truncation=True,
        ).to(judge.device)))
        for b in range(0, len(prompts), max_batch)
    ])  # (U, D)  # fmt: skip
    images = [img.convert("RGB") for img in (*sources, *edits)]
    pixels = torch.cat([
        _features(judge.model.get_image_features(**judge.processor(
            images=images[b : b + max_batch], return_tensors="pt"
        ).to(judge.device)))
        for b in range(0, len(images), max_batch)
    ])  # (2n, D)  # fmt: skip
    # 3. Directions and their cosine
    index = {p: i for i, p in enumerate(prompts)}
    t = _unit(text.float())
    img = _unit(pixels.float())
    d_text = t[[index[p] for p in target_prompts]] - t[[index[p] for p in source_prompts]]  # (n, D)
    d_img = img[n:] - img[:n]  # (n, D)
    norms = d_text.norm(dim=-1) * d_img.norm(dim=-1)
    cos = (d_text * d_img).sum(-1) / norms.clamp_min(1e-12)
    cos = torch.where(norms > 1e-12, cos, torch.full_like(cos, float("nan")))
    return [float(c) for c in cos.cpu()]
