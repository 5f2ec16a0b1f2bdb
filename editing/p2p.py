"""Prompt-to-Prompt cross-attention control (Hertz et al. 2022) on Direct-Inversion latents, batched.

The conditional target rows take the source row's cross-attention maps (mapped onto the target's
tokens, reweighted by the equalizer, for the first `cross_replace_steps`) and, at low resolutions, its
self-attention maps (first `self_replace_steps`); local blend keeps the latent outside the chosen words'
mask equal to the source's trajectory. Everything per chunk is decided up front in a :class:`P2PPlan`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from editing import alignment
from editing.attention import ChunkPlan, ControlState, controlled_unet
from editing.batching import (
    EditResult,
    Piece,
    RowLayout,
    SourceGroup,
    Target,
    check_finite,
    chunk_results,
    chunk_targets,
    denoise_level,
    latent_positions,
    layout_rows,
    make_batch,
)
from editing.configs import P2PConfig
from editing.model import EditModel


def blend_fraction(model: EditModel, config: P2PConfig) -> float:
    """The share of the latent's positions of the cross-attention layers local blend reads."""
    return config.blend_fraction or float(model.defaults.get("p2p_blend_fraction", 1 / 16))


def level_positions(latent: tuple[int, int], fraction: float, *, at_most: bool = False) -> int:
    """Query positions of the UNet level with `fraction` of the latent's (h, w) positions: k downsamples
    give 4**-k, ceil(h / 2**k) * ceil(w / 2**k) positions (a stride-2 conv rounds an odd side up).
    `at_most`: the largest level with at most `fraction` (0 when none); else the level of exactly
    `fraction`, or round(fraction * h * w) when it is no power of 1/4 (which no layer has)."""
    h, w = latent
    for k in range(32):
        nominal = 4.0**-k
        if (nominal <= fraction * (1 + 1e-9)) if at_most else math.isclose(nominal, fraction):
            grid_h, grid_w = level_grid(h, w, k)
            return grid_h * grid_w
    return 0 if at_most else int(round(fraction * h * w))


def level_grid(h: int, w: int, k: int) -> tuple[int, int]:
    """The grid of the UNet level `k` downsamplings below a latent of h x w: odd sides are rounded up
    at each downsampling (a stride-2 conv with padding)."""
    return -(-h // 2**k), -(-w // 2**k)


def chunk_key(model: EditModel, group: SourceGroup, target: Target) -> Any:
    """Targets share a chunk when they control the same layers."""
    return (target.config.self_max_fraction, blend_fraction(model, target.config))


@dataclass(frozen=True)
class LocalBlend:
    """One target's local blend: its edit acts only inside the chosen words' attention mask."""

    target: int  # the target's index in the chunk
    row: int  # its conditional row
    source_row: int  # its source's row
    source_positions: torch.Tensor  # token positions of the source words, on the UNet's device
    target_positions: torch.Tensor  # token positions of the target words, on the UNet's device
    threshold: float
    start_step: int  # the first step that blends
    normalize: str


@dataclass(frozen=True)
class P2PPlan:
    """What Prompt-to-Prompt decides for one chunk before its loop (host-side; rows as in the layout)."""

    mapper: torch.Tensor  # (B, L, L) source token -> target token
    alpha: torch.Tensor  # (B, L) 1 where the target token takes the mapped source map
    equalizer: torch.Tensor  # (B, L) per-token map weights
    cross_schedule: torch.Tensor  # (B, T, L) per step, the cross-replace weight of each token
    self_max_positions: (
        int  # self-attention is replaced only at layers with at most these positions
    )
    blend_positions: int  # local blend reads cross maps at layers with these positions; -1: none
    blends: tuple[LocalBlend, ...]  # the targets with a local blend, in chunk order


def plan_chunk(model: EditModel, pieces: Sequence[Piece], layout: RowLayout, steps: int) -> P2PPlan:
    """Align each target's prompt with its source's (mapper, alpha), its equalizer, cross-replace
    schedule and local blend, on its conditional row."""
    tok, length, b = model.tokenizer, model.max_tokens, layout.size
    mapper, alpha = torch.zeros(b, length, length), torch.ones(b, length)
    equalizer, schedule = torch.ones(b, length), torch.zeros(b, steps, length)
    blends = []
    for j, t in enumerate(layout.targets):
        source = pieces[layout.target_piece[j]].group.inversion.source_prompt
        cfg: P2PConfig = t.config
        kind = alignment.resolve_kind(tok, cfg.kind, source, t.prompt)
        r = layout.c_rows[j]
        mapper[r], alpha[r] = alignment.p2p_mapper(tok, kind, source, t.prompt)
        equalizer[r] = alignment.equalizer_vector(tok, t.prompt, dict(cfg.equalizer))
        schedule[r] = alignment.cross_replace_schedule(
            tok, t.prompt, cfg.cross_replace_steps, steps
        )
        if cfg.blend_source_words:
            blends.append(_local_blend(model, layout, j, source, steps))
    cfg0: P2PConfig = layout.targets[0].config
    latent = tuple(pieces[0].group.inversion.latent_shape[-2:])
    return P2PPlan(
        mapper=mapper,
        alpha=alpha,
        equalizer=equalizer,
        cross_schedule=schedule,
        self_max_positions=level_positions(latent, cfg0.self_max_fraction, at_most=True),
        blend_positions=level_positions(latent, blend_fraction(model, cfg0)) if blends else -1,
        blends=tuple(blends),
    )


def _local_blend(
    model: EditModel, layout: RowLayout, j: int, source: str, steps: int
) -> LocalBlend:
    t = layout.targets[j]
    cfg: P2PConfig = t.config
    tok = model.tokenizer
    return LocalBlend(
        target=j,
        row=layout.c_rows[j],
        source_row=layout.src_rows[layout.target_piece[j]],
        source_positions=torch.tensor(
            alignment.positions_of(tok, source, cfg.blend_source_words), device=model.device
        ),
        target_positions=torch.tensor(
            alignment.positions_of(tok, t.prompt, cfg.blend_target_words), device=model.device
        ),
        threshold=cfg.blend_threshold,
        start_step=int(cfg.blend_start * steps),
        normalize=cfg.blend_normalize,
    )


@torch.no_grad()
def edit_chunk(model: EditModel, pieces: list[Piece], *, pad: bool = False) -> list[EditResult]:
    """One chunk of Prompt-to-Prompt edits (`pieces` share :func:`chunk_key`); `pad`: run at a fixed
    batch shape (:func:`editing.batching.padded_rows`)."""
    # 1. Validate: the chunk shares steps, latent shape and self-attention cap (its key)
    start = time.perf_counter()
    steps = pieces[0].group.inversion.num_steps
    # 2. Encode prompts, lay out the rows, align each target's words with its source's, place the plan
    self_steps = [int(t.config.self_replace_steps * steps) for t in chunk_targets(pieces)]
    layout = layout_rows(pieces, True, attn_steps=self_steps, pad=pad)
    batch = make_batch(model, pieces, layout)
    p2p = plan_chunk(model, pieces, layout, steps)
    plan = ChunkPlan.place(  # every index and schedule on the UNet's device, once
        layout,
        steps,
        model.device,
        model.dtype,
        latent_positions=latent_positions(pieces),
        cross={
            "mapper": p2p.mapper,
            "alpha": p2p.alpha,
            "equalizer": p2p.equalizer,
            "schedule": p2p.cross_schedule,
        },
        self_max_positions=p2p.self_max_positions,
        blend_positions=p2p.blend_positions,
    )
    state = ControlState(plan)
    # 3. Start every target from its source's z_T
    z = batch.start_latents()  # (n, C, h, w) fp32 (fp64 for fp64 models)
    finite = torch.ones(steps, dtype=torch.bool, device=model.device)  # read back after the loop
    # 4. Install processors, 5. denoise (local blend after each step; no host round trip inside)
    with controlled_unet(model.unet, state, p2p=True, sdpa=model.sdpa):
        for i, level in enumerate(range(steps, 0, -1)):
            state.set_step(i)
            state.outputs.new_step()
            z = denoise_level(model, batch, z, level)
            if p2p.blends:
                z = local_blend(p2p, state, z, batch.source_latents(level - 1), i)
            finite[i] = torch.isfinite(z).all()
    check_finite(finite)
    # 6. Decode
    return chunk_results(model, pieces, layout, z, "p2p", start=start)


def local_blend(
    plan: P2PPlan, state: ControlState, z: torch.Tensor, z_src: torch.Tensor, i: int
) -> torch.Tensor:
    """After step `i`: each blending target keeps its source's latent `z_src` outside its mask."""
    out = state.outputs
    if out.blend_count == 0:
        raise ValueError(
            f"local blend: no cross-attention layer has {state.plan.blend_positions} positions; "
            "set blend_fraction"
        )
    maps = out.blend_sum / out.blend_count  # (B, Q, L)
    for blend in plan.blends:
        if i < blend.start_step:
            continue
        mask = local_blend_mask(
            maps[blend.source_row][:, blend.source_positions],
            maps[blend.row][:, blend.target_positions],
            tuple(z.shape[-2:]),
            blend.threshold,
            blend.normalize,
        )
        j = blend.target
        z[j] = z_src[j] + mask.to(z.device, z.dtype) * (z[j] - z_src[j])
    return z


def local_blend_mask(
    src_maps: torch.Tensor,
    tgt_maps: torch.Tensor,
    size: tuple[int, int],
    threshold: float,
    normalize: str = "minmax",
) -> torch.Tensor:
    """Prompt-to-Prompt's local-blend mask (1, h, w) from the chosen words' maps (Q, n_words_tokens) each.

    Per prompt: sum the words' maps, 3x3 max-pool, upsample (nearest) to the latent size, normalise,
    threshold; the mask is the union of the source's and the target's. `normalize`: "max" divides by the
    maximum (the reference); "minmax" maps [min, max] to [0, 1], the same on maps that are ~0 away from
    the word (SD's) but not all ones on maps with a constant floor (a small model's: every cell > 0.3 max).
    """
    h, w = size
    side = math.sqrt(h * w / src_maps.shape[0])
    mh, mw = round(h / side), round(w / side)
    for k in range(32):  # the level whose grid has as many cells as the maps
        grid_h, grid_w = level_grid(h, w, k)
        if grid_h * grid_w == src_maps.shape[0]:
            mh, mw = grid_h, grid_w
            break
    masks = []
    for maps in (src_maps, tgt_maps):
        m = maps.sum(-1).view(1, 1, mh, mw)
        m = F.max_pool2d(m, 3, stride=1, padding=1)
        m = F.interpolate(m, size=(h, w), mode="nearest")
        if normalize == "minmax":
            m = m - m.min()
        elif normalize != "max":
            raise ValueError(f"unknown local-blend normalisation {normalize!r}")
        masks.append(m / m.max().clamp_min(1e-12) > threshold)
    return (masks[0] | masks[1]).float()[0]
