"""Plug-and-Play diffusion features (Tumanyan et al., CVPR 2023) on Direct-Inversion latents, batched.

The target rows take the source row's residual features (decoder layer 4's conv2) and self-attention
queries/keys (decoder layers 4-11) for the first `feature_t` / `attn_t` of the steps. The source branch's
injections can be recorded (:class:`PnPFeatures`) and replayed later, so a warm edit runs no source row.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from editing.attention import ChunkPlan, ControlState, StepOutputs, controlled_unet
from editing.batching import (
    EditResult,
    Piece,
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
from editing.configs import (
    SD_PNP_ATTN_LAYERS,
    SD_PNP_FEATURE_LAYERS,
    PnPConfig,
)
from editing.inversion import Inversion
from editing.model import EditModel

FEATURES_FORMAT = "editflow-pnp-features-1"


@dataclass
class PnPFeatures:
    """A source branch's PnP injections (per layer and step, fp16) so a warm edit runs no source row."""

    tensors: dict[str, torch.Tensor]  # "{layer}.{q|k|conv2}@{step}" -> (1, ...)
    facts: dict[str, Any]

    def to_bytes(self) -> bytes:
        return st_save(
            {k: v.contiguous() for k, v in self.tensors.items()},
            metadata={"facts": json.dumps(self.facts, sort_keys=True)},
        )

    @classmethod
    def from_bytes(cls, data: bytes, expect: dict[str, Any] | None = None) -> PnPFeatures:
        try:
            n = int.from_bytes(data[:8], "little")
            facts = json.loads(json.loads(data[8 : 8 + n])["__metadata__"]["facts"])
            tensors = st_load(data)
        except Exception as exc:  # noqa: BLE001
            raise ValueError(f"unreadable PnP features blob ({type(exc).__name__}: {exc})") from exc
        if expect:
            diff = sorted(k for k, v in expect.items() if facts.get(k) != v)
            if diff:
                raise ValueError(f"PnP features were made for other settings: {diff}")
        return cls(tensors, facts)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def pnp_feature_facts(model: EditModel, inversion: Inversion, config: PnPConfig) -> dict[str, Any]:
    """What cached PnP features depend on: the inversion's facts, the layers and the injected steps."""
    feats, attns = pnp_layers(model, config)
    steps = inversion.num_steps
    return {
        "format": FEATURES_FORMAT,
        "inversion": {k: inversion.facts.get(k) for k in sorted(inversion.facts)},
        "feature_layers": list(feats),
        "attn_layers": list(attns),
        "feature_steps": int(config.feature_t * steps),
        "attn_steps": int(config.attn_t * steps),
        # only when not the default, so caches made before the setting existed keep their keys
        **({"source_text": config.source_text} if config.source_text != "source" else {}),
    }


def pnp_layers(model: EditModel, config: PnPConfig) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The PnP layers for this model: the config's, else the model's recorded defaults, else SD's."""
    feats = config.feature_layers or tuple(
        model.defaults.get("pnp_feature_layers", SD_PNP_FEATURE_LAYERS)
    )
    attns = config.attn_layers or tuple(model.defaults.get("pnp_attn_layers", SD_PNP_ATTN_LAYERS))
    return tuple(feats), tuple(attns)


def chunk_key(model: EditModel, group: SourceGroup, target: Target) -> Any:
    """Targets share a chunk when they inject the same layers from the same kind of source branch."""
    config = target.config
    return (*pnp_layers(model, config), config.source_text, group.features is not None)


@torch.no_grad()
def edit_chunk(
    model: EditModel, pieces: list[Piece], *, record_features: bool = False, pad: bool = False
) -> list[EditResult]:
    """One chunk of Plug-and-Play edits (`pieces` share :func:`chunk_key`); `record_features`: a live
    chunk returns its source features with each result (to cache them); `pad`: run at a fixed batch
    shape (:func:`editing.batching.padded_rows`)."""
    # 1. Validate: the chunk shares layers and source text (its key); cached features must cover it
    live = pieces[0].group.features is None
    feats, attns = pnp_layers(model, pieces[0].targets[0].config)
    if not live:
        _check_cached_features(model, pieces)
    start = time.perf_counter()
    steps = pieces[0].group.inversion.num_steps
    # 2. Encode prompts, lay out the rows (a source row per piece unless replaying), place the plan
    configs = [t.config for t in chunk_targets(pieces)]
    layout = layout_rows(
        pieces,
        live,
        feature_steps=[int(c.feature_t * steps) for c in configs],
        attn_steps=[int(c.attn_t * steps) for c in configs],
        inject_uncond=[c.inject_uncond for c in configs],
        pad=pad,
    )
    empty_source = [p.targets[0].config.source_text == "empty" for p in pieces]
    batch = make_batch(model, pieces, layout, empty_source)
    record = record_features and live
    plan = ChunkPlan.place(  # every index and replayed feature on the UNet's device, once
        layout,
        steps,
        model.device,
        model.dtype,
        latent_positions=latent_positions(pieces),
        replay=None if live else _stack_features([p.group.features for p in pieces]),
    )
    state = ControlState(plan, StepOutputs(record={} if record else None))
    # 3. Start every target from its source's z_T
    z = batch.start_latents()  # (n, C, h, w) fp32 (fp64 for fp64 models)
    finite = torch.ones(steps, dtype=torch.bool, device=model.device)  # read back after the loop
    # 4. Install processors, 5. denoise (no host round trip inside)
    with controlled_unet(
        model.unet, state, pnp_attn_parents=attns, pnp_feature_layers=feats, sdpa=model.sdpa
    ):
        for i, level in enumerate(range(steps, 0, -1)):
            state.set_step(i)
            state.outputs.new_step()
            z = denoise_level(model, batch, z, level)
            finite[i] = torch.isfinite(z).all()
    check_finite(finite)
    # 6. Decode (and split the recorded source features per piece)
    recorded = _split_features(state.outputs.recorded(plan), pieces, model) if record else None
    return chunk_results(model, pieces, layout, z, "pnp", start=start, features=recorded)


def _check_cached_features(model: EditModel, pieces: Sequence[Piece]) -> None:
    """Refuse cached features that lack this chunk's layers, source text or injected steps."""
    for piece in pieces:
        have = piece.group.features.facts
        # the facts once per distinct config of the piece (its targets often share one)
        wants = {
            t.config: pnp_feature_facts(model, piece.group.inversion, t.config)
            for t in piece.targets
        }
        for want in wants.values():
            if not _covers(have, want):
                raise ValueError(
                    "cached PnP features do not cover this edit's layers/steps; "
                    "drop them to recompute"
                )


def _covers(have: dict[str, Any], want: dict[str, Any]) -> bool:
    return (
        all(have.get(k) == want[k] for k in ("inversion", "feature_layers", "attn_layers"))
        and have.get("source_text", "source") == want.get("source_text", "source")
        and have.get("feature_steps", -1) >= want["feature_steps"]
        and have.get("attn_steps", -1) >= want["attn_steps"]
    )


def _stack_features(features: list[PnPFeatures | None]) -> dict[str, torch.Tensor]:
    if any(f is None for f in features):
        raise ValueError("a replay chunk needs cached features for every source")
    keys = set(features[0].tensors)
    for f in features[1:]:
        if set(f.tensors) != keys:
            raise ValueError("cached PnP features of one chunk were made with different settings")
    return {k: torch.cat([f.tensors[k] for f in features]) for k in keys}


def _split_features(
    record: dict[str, torch.Tensor], pieces: Sequence[Piece], model: EditModel
) -> list[PnPFeatures]:
    # recorded on the UNet's device; one copy each, after the loop
    record = {k: v.cpu() for k, v in record.items()}
    return [
        PnPFeatures(
            {k: v[pi : pi + 1].clone() for k, v in record.items()},
            pnp_feature_facts(model, piece.group.inversion, piece.targets[0].config),
        )
        for pi, piece in enumerate(pieces)
    ]
