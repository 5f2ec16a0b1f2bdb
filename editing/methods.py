"""The editing methods (Prompt-to-Prompt, Plug-and-Play) on real images, batched, behind one entry shape.

Every method is ``fn(model, groups, *, max_batch=8, record_features=False) -> list[list[EditResult]]``:
each :class:`SourceGroup` is one inverted source image with K targets, and the result has one list per
group in target order. A registry (:data:`METHODS`) maps method names to them; :func:`edit` dispatches a
mixed list by each target's config type.

Batch layout of one UNet call (one "chunk"; several source images may share it):

    [ src_g0, u_g0t0, c_g0t0, u_g0t1, c_g0t1, ..., src_g1, u_g1t0, c_g1t0, ... ]

`src_g` is group g's source row: its latent is the inversion trajectory z*_k at the current level and its
text the source prompt (PnP with ``source_text="empty"``: the empty prompt, as the published codes; no
guidance: Direct Inversion makes the source branch equal the trajectory, so its own guided update is never
needed); it exists only to provide the attention maps (P2P) or the
features and queries/keys (PnP) that the target rows take, and its output is discarded. With cached PnP
features there is no source row at all. `u`/`c` are each target's unconditional (negative prompt) and
conditional rows, combined by classifier-free guidance. Targets per chunk are at most `max_batch`; a
group with more targets is split over chunks (each chunk then runs that group's source row again).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from editing import alignment
from editing.attention import ControlState, RowPlan, controlled_unet
from editing.configs import SD_PNP_ATTN_LAYERS, SD_PNP_FEATURE_LAYERS, P2PConfig, PnPConfig
from editing.ddim import denoise_step, guide, make_schedule
from editing.inversion import Inversion, NonFiniteError
from editing.model import EditModel

logger = logging.getLogger(__name__)

FEATURES_FORMAT = "editflow-pnp-features-1"


@dataclass(frozen=True)
class Target:
    """One wanted edit of a source image."""

    prompt: str
    config: PnPConfig | P2PConfig = field(default_factory=PnPConfig)
    edit_id: str | None = None
    seed: int | None = None  # editing is deterministic (DDIM, eta = 0); kept for provenance


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


@dataclass
class SourceGroup:
    """One inverted source image and the targets to make from it."""

    inversion: Inversion
    targets: list[Target]
    features: PnPFeatures | None = None  # cached PnP source features; skips the source row


@dataclass
class EditResult:
    edit_id: str | None
    prompt: str
    method: str
    image: Image.Image
    latent: torch.Tensor  # (C, h, w) final latent, fp32, CPU
    unet_evals: dict[str, float]  # {"source": share of the source row's evaluations, "target": 2T}
    seconds: float  # this edit's share of the chunk's wall time
    features: PnPFeatures | None = None  # recorded source features (record_features=True, PnP)


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


# ---------------------------------------------------------------- chunking


Piece = tuple[int, SourceGroup, list[int]]  # (group index, group, indices of its targets)


def _chunks(
    groups: Sequence[SourceGroup], max_batch: int, key: Callable[[SourceGroup, Target], Any]
) -> list[list[Piece]]:
    """Pack groups' targets into chunks of at most `max_batch` targets with equal `key`s."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    open_chunks: dict[Any, tuple[list[Piece], int]] = {}
    done: list[list[Piece]] = []
    for gi, group in enumerate(groups):
        by_key: dict[Any, list[int]] = {}
        for ti, target in enumerate(group.targets):
            by_key.setdefault(key(group, target), []).append(ti)
        for k, idxs in by_key.items():
            for start in range(0, len(idxs), max_batch):
                part = idxs[start : start + max_batch]
                chunk, used = open_chunks.get(k, ([], 0))
                if used + len(part) > max_batch and chunk:
                    done.append(chunk)
                    chunk, used = [], 0
                chunk.append((gi, group, part))
                open_chunks[k] = (chunk, used + len(part))
    done.extend(chunk for chunk, _ in open_chunks.values() if chunk)
    return done


# ---------------------------------------------------------------- the shared loop


@dataclass
class _Rows:
    """Row bookkeeping of one chunk."""

    plan: RowPlan
    src_rows: list[int]  # per piece; empty when replaying
    u_rows: list[int]  # per target (chunk order)
    c_rows: list[int]
    target_piece: list[int]  # piece index of each target
    targets: list[Target]


def _layout(pieces: list[Piece], steps: int, live: bool, feature_steps, attn_steps) -> _Rows:
    src, group, cond_t, tgt, fsteps, asteps = [], [], [], [], [], []
    src_rows, u_rows, c_rows, tpiece, targets = [], [], [], [], []

    def add(s: int, g: int, is_t: bool, is_c: bool, fs: int, at: int) -> int:
        src.append(s)
        group.append(g)
        tgt.append(is_t)
        cond_t.append(is_t and is_c)
        fsteps.append(fs)
        asteps.append(at)
        return len(src) - 1

    for pi, (_, grp, idxs) in enumerate(pieces):
        s_row = add(-1, pi, False, False, 0, 0) if live else -1
        if live:
            src_rows.append(s_row)
        for ti in idxs:
            t = grp.targets[ti]
            fs, at = feature_steps(t.config, steps), attn_steps(t.config, steps)
            inject_u = isinstance(t.config, PnPConfig) and t.config.inject_uncond
            u_rows.append(add(s_row, pi, inject_u, False, fs, at))
            c_rows.append(add(s_row, pi, True, True, fs, at))
            tpiece.append(pi)
            targets.append(t)
    plan = RowPlan(
        src=torch.tensor(src),
        group=torch.tensor(group),
        source_rows=torch.tensor(src_rows, dtype=torch.long),
        cond_target=torch.tensor(cond_t),
        target=torch.tensor(tgt),
        feature_steps=torch.tensor(fsteps),
        attn_steps=torch.tensor(asteps),
    )
    return _Rows(plan, src_rows, u_rows, c_rows, tpiece, targets)


@torch.no_grad()
def _run_chunk(
    model: EditModel,
    pieces: list[Piece],
    method: str,
    *,
    live: bool,
    prepare: Callable[[_Rows, ControlState, int], dict[str, Any]],
    after_step: Callable[[ControlState, _Rows, torch.Tensor, torch.Tensor, int], torch.Tensor]
    | None = None,
    record: bool = False,
) -> list[EditResult]:
    start = time.perf_counter()
    # 1. Validate: every piece shares steps and latent shape (guaranteed by the chunk key)
    inv0 = pieces[0][1].inversion
    steps = inv0.num_steps
    schedule = make_schedule(model.scheduler, steps)
    dev, dt = model.device, model.dtype
    # 2. Encode prompts and lay out the rows
    rows = _layout(pieces, steps, live, _feature_steps, _attn_steps)
    b = len(rows.plan.src)
    emb = [None] * b
    empty = (
        None  # PnP source_text="empty": the source rows see "" (encoded once per chunk, on `dev`)
    )
    for pi, row in enumerate(rows.src_rows):
        _, grp, idxs = pieces[pi]
        if _source_text(grp.targets[idxs[0]].config) == "empty":
            empty = model.encode_prompts([""])[0] if empty is None else empty
            emb[row] = empty
        else:
            emb[row] = grp.inversion.cond.to(dev, dt)
    neg = model.encode_prompts([t.config.negative_prompt for t in rows.targets])
    pos = model.encode_prompts([t.prompt for t in rows.targets])
    for j, (u, c) in enumerate(zip(rows.u_rows, rows.c_rows)):
        emb[u], emb[c] = neg[j], pos[j]
    emb_t = torch.stack(emb)
    traj = torch.stack([g.inversion.latents for _, g, _ in pieces]).to(dev)  # (P, T+1, C, h, w)
    corr = torch.stack([g.inversion.corrections for _, g, _ in pieces]).to(dev)  # (P, T, C, h, w)
    tpiece = torch.tensor(rows.target_piece, device=dev)
    correct = torch.tensor(
        [t.config.target_correction for t in rows.targets], device=dev, dtype=traj.dtype
    )
    scales = torch.tensor([t.config.guidance_scale for t in rows.targets], device=dev)
    state = ControlState(plan=rows.plan, latent_positions=int(traj.shape[-1] * traj.shape[-2]))
    if record:
        state.record = {}
    if not live:
        state.replay = _stack_features([g.features for _, g, _ in pieces])
    install = prepare(rows, state, steps)
    state.place(
        steps, dev, dt
    )  # every index, schedule and replayed feature on the UNet's device, once
    # 3. Start every target from its source's z_T
    z = traj[tpiece, steps].clone()  # (n, C, h, w) fp32 (fp64 for fp64 models)
    u_idx, c_idx = torch.tensor(rows.u_rows, device=dev), torch.tensor(rows.c_rows, device=dev)
    src_idx = torch.tensor(rows.src_rows, device=dev, dtype=torch.long)
    x = torch.empty((b, *z.shape[1:]), device=dev, dtype=traj.dtype)
    timesteps = schedule.timesteps_on(dev)
    finite = torch.ones(
        steps, dtype=torch.bool, device=dev
    )  # per step; read back once, after the loop
    # 4. Install processors, 5. denoise (no host round trip inside: see editing.attention.ControlState)
    with controlled_unet(model.unet, state, **install):
        for i, level in enumerate(range(steps, 0, -1)):
            state.step = i
            state.blend_sum, state.blend_count = None, 0
            if live:
                x[src_idx] = traj[:, level]
            x[u_idx], x[c_idx] = z, z
            out = model.unet(x.to(dt), timesteps[level - 1], encoder_hidden_states=emb_t).sample
            guided = guide(out[u_idx], out[c_idx], scales)
            z = (
                denoise_step(guided, z, schedule, level)
                + correct.view(-1, 1, 1, 1) * corr[tpiece, level - 1]
            )
            if after_step is not None:
                z = after_step(state, rows, z, traj[tpiece, level - 1], i)
            finite[i] = torch.isfinite(z).all()
    if not bool(finite.all()):
        i = int(torch.nonzero(~finite)[0])
        raise NonFiniteError(f"non-finite latents at step {i} (level {steps - i}); try fp32")
    # 6. Decode
    images = model.decode_latents(z)
    seconds = (time.perf_counter() - start) / len(rows.targets)
    per_piece = [len(idxs) for _, _, idxs in pieces]
    results = []
    recorded = _split_features(state.record, pieces, model) if record and live else None
    for j, t in enumerate(rows.targets):
        pi = rows.target_piece[j]
        results.append(
            EditResult(
                edit_id=t.edit_id,
                prompt=t.prompt,
                method=method,
                image=images[j],
                latent=z[j].cpu(),
                unet_evals={"source": (steps if live else 0) / per_piece[pi], "target": 2 * steps},
                seconds=seconds,
                features=recorded[pi] if recorded else None,
            )
        )
    return results


def _source_text(config) -> str:
    """The text of a chunk's source rows: the source prompt, or "" for PnP with source_text="empty"."""
    return config.source_text if isinstance(config, PnPConfig) else "source"


def _feature_steps(config, steps: int) -> int:
    return int(config.feature_t * steps) if isinstance(config, PnPConfig) else 0


def _attn_steps(config, steps: int) -> int:
    if isinstance(config, PnPConfig):
        return int(config.attn_t * steps)
    return int(config.self_replace_steps * steps)


def _stack_features(features: list[PnPFeatures | None]) -> dict[str, torch.Tensor]:
    if any(f is None for f in features):
        raise ValueError("a replay chunk needs cached features for every source")
    keys = set(features[0].tensors)
    for f in features[1:]:
        if set(f.tensors) != keys:
            raise ValueError("cached PnP features of one chunk were made with different settings")
    return {k: torch.cat([f.tensors[k] for f in features]) for k in keys}


def _split_features(
    record: dict[str, torch.Tensor], pieces: list[Piece], model: EditModel
) -> list[PnPFeatures]:
    record = {
        k: v.cpu() for k, v in record.items()
    }  # recorded on the UNet's device; one copy each, after the loop
    out = []
    for pi, (_, group, idxs) in enumerate(pieces):
        config = group.targets[idxs[0]].config
        out.append(
            PnPFeatures(
                {k: v[pi : pi + 1].clone() for k, v in record.items()},
                pnp_feature_facts(model, group.inversion, config),
            )
        )
    return out


def _run_all(
    model: EditModel,
    groups: Sequence[SourceGroup],
    method: str,
    config_type: type,
    max_batch: int,
    extra_key: Callable[[SourceGroup, Target], Any],
    run: Callable[[list[Piece]], list[EditResult]],
) -> list[list[EditResult]]:
    for gi, g in enumerate(groups):
        for t in g.targets:
            if not isinstance(t.config, config_type):
                raise ValueError(
                    f"group {gi}: target {t.prompt!r} has a {type(t.config).__name__}, {method} needs {config_type.__name__}"
                )

    def key(g: SourceGroup, t: Target) -> Any:
        return (g.inversion.num_steps, g.inversion.latent_shape, extra_key(g, t))

    out: list[list[EditResult | None]] = [[None] * len(g.targets) for g in groups]
    for chunk in _chunks(groups, max_batch, key):
        results = iter(run(chunk))
        for gi, _, idxs in chunk:
            for ti in idxs:
                out[gi][ti] = next(results)
    return out  # type: ignore[return-value]


# ---------------------------------------------------------------- Plug-and-Play


def edit_pnp(
    model: EditModel,
    groups: Sequence[SourceGroup],
    *,
    max_batch: int = 8,
    record_features: bool = False,
) -> list[list[EditResult]]:
    """Plug-and-Play diffusion features (Tumanyan et al., CVPR 2023) on Direct-Inversion latents."""

    def extra(g: SourceGroup, t: Target) -> Any:
        return (*pnp_layers(model, t.config), t.config.source_text, g.features is not None)

    def run(pieces: list[Piece]) -> list[EditResult]:
        live = pieces[0][1].features is None
        feats, attns = pnp_layers(model, pieces[0][1].targets[pieces[0][2][0]].config)
        if not live:
            for _, g, idxs in pieces:
                for ti in idxs:
                    want = pnp_feature_facts(model, g.inversion, g.targets[ti].config)
                    have = g.features.facts
                    if (
                        any(
                            have.get(k) != want[k]
                            for k in ("inversion", "feature_layers", "attn_layers")
                        )
                        or (have.get("source_text", "source") != want.get("source_text", "source"))
                        or (
                            have.get("feature_steps", -1) < want["feature_steps"]
                            or have.get("attn_steps", -1) < want["attn_steps"]
                        )
                    ):
                        raise ValueError(
                            "cached PnP features do not cover this edit's layers/steps; drop them to recompute"
                        )

        def prepare(rows: _Rows, state: ControlState, steps: int) -> dict[str, Any]:
            return {"pnp_attn_parents": attns, "pnp_feature_layers": feats}

        return _run_chunk(
            model, pieces, "pnp", live=live, prepare=prepare, record=record_features and live
        )

    return _run_all(model, groups, "pnp", PnPConfig, max_batch, extra, run)


# ---------------------------------------------------------------- Prompt-to-Prompt


def edit_p2p(
    model: EditModel,
    groups: Sequence[SourceGroup],
    *,
    max_batch: int = 8,
    record_features: bool = False,
) -> list[list[EditResult]]:
    """Prompt-to-Prompt cross-attention control (Hertz et al. 2022) on Direct-Inversion latents."""
    tok = model.tokenizer
    length = model.max_tokens

    def blend_fraction(c: P2PConfig) -> float:
        return c.blend_fraction or float(model.defaults.get("p2p_blend_fraction", 1 / 16))

    def extra(g: SourceGroup, t: Target) -> Any:
        return (t.config.self_max_fraction, blend_fraction(t.config))

    def run(pieces: list[Piece]) -> list[EditResult]:
        blends: list[
            tuple[int, torch.Tensor, torch.Tensor, float, int] | None
        ] = []  # token positions on the device

        def prepare(rows: _Rows, state: ControlState, steps: int) -> dict[str, Any]:
            b = len(rows.plan.src)
            mapper = torch.zeros(b, length, length)
            alpha = torch.ones(b, length)
            eq = torch.ones(b, length)
            sched = torch.zeros(b, steps, length)
            for j, t in enumerate(rows.targets):
                source = pieces[rows.target_piece[j]][1].inversion.source_prompt
                cfg: P2PConfig = t.config
                kind = alignment.resolve_kind(tok, cfg.kind, source, t.prompt)
                r = rows.c_rows[j]
                mapper[r], alpha[r] = alignment.p2p_mapper(tok, kind, source, t.prompt)
                eq[r] = alignment.equalizer_vector(tok, t.prompt, dict(cfg.equalizer))
                sched[r] = alignment.cross_replace_schedule(
                    tok, t.prompt, cfg.cross_replace_steps, steps
                )
                if cfg.blend_source_words:
                    blends.append(
                        (
                            r,
                            torch.tensor(
                                alignment.positions_of(tok, source, cfg.blend_source_words),
                                device=model.device,
                            ),
                            torch.tensor(
                                alignment.positions_of(tok, t.prompt, cfg.blend_target_words),
                                device=model.device,
                            ),
                            cfg.blend_threshold,
                            int(cfg.blend_start * steps),
                            cfg.blend_normalize,
                        )
                    )
                else:
                    blends.append(None)
            rows.plan.mapper, rows.plan.alpha, rows.plan.equalizer, rows.plan.cross_schedule = (
                mapper,
                alpha,
                eq,
                sched,
            )
            cfg0: P2PConfig = rows.targets[0].config
            state.self_max_positions = int(cfg0.self_max_fraction * state.latent_positions)
            state.blend_positions = (
                int(round(blend_fraction(cfg0) * state.latent_positions)) if any(blends) else -1
            )
            return {"p2p": True}

        def after_step(
            state: ControlState, rows: _Rows, z: torch.Tensor, z_src: torch.Tensor, i: int
        ) -> torch.Tensor:
            if not any(blends):
                return z
            if state.blend_count == 0:
                raise ValueError(
                    f"local blend: no cross-attention layer has {state.blend_positions} positions; set blend_fraction"
                )
            maps = state.blend_sum / state.blend_count  # (B, Q, L)
            for j, spec in enumerate(blends):
                if spec is None or i < spec[4]:
                    continue
                r, src_pos, tgt_pos, threshold, _, norm = spec
                s = rows.src_rows[
                    rows.target_piece[j]
                ]  # the target's source row (host-side, no read-back)
                mask = local_blend_mask(
                    maps[s][:, src_pos], maps[r][:, tgt_pos], tuple(z.shape[-2:]), threshold, norm
                )
                z[j] = z_src[j] + mask.to(z.device, z.dtype) * (z[j] - z_src[j])
            return z

        return _run_chunk(model, pieces, "p2p", live=True, prepare=prepare, after_step=after_step)

    if record_features:
        raise ValueError("record_features is a Plug-and-Play option")
    return _run_all(model, groups, "p2p", P2PConfig, max_batch, extra, run)


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


METHODS: dict[str, Callable[..., list[list[EditResult]]]] = {"pnp": edit_pnp, "p2p": edit_p2p}
METHOD_OF_CONFIG: dict[type, str] = {PnPConfig: "pnp", P2PConfig: "p2p"}


def edit(
    model: EditModel,
    groups: Sequence[SourceGroup],
    *,
    max_batch: int = 8,
    record_features: bool = False,
) -> list[list[EditResult]]:
    """Edit every group's targets, each with the method its config names; one result list per group."""
    out: list[list[EditResult | None]] = [[None] * len(g.targets) for g in groups]
    for method, fn in METHODS.items():
        sub, where = [], []
        for gi, g in enumerate(groups):
            idxs = [
                ti
                for ti, t in enumerate(g.targets)
                if METHOD_OF_CONFIG.get(type(t.config)) == method
            ]
            if idxs:
                sub.append(
                    SourceGroup(
                        g.inversion,
                        [g.targets[ti] for ti in idxs],
                        g.features if method == "pnp" else None,
                    )
                )
                where.append((gi, idxs))
        if not sub:
            continue
        kwargs = {"record_features": record_features} if method == "pnp" else {}
        for (gi, idxs), res in zip(where, fn(model, sub, max_batch=max_batch, **kwargs)):
            for ti, r in zip(idxs, res):
                out[gi][ti] = r
    for gi, g in enumerate(groups):
        for ti, t in enumerate(g.targets):
            if out[gi][ti] is None:
                raise ValueError(
                    f"group {gi}: target {t.prompt!r} has an unknown config type {type(t.config).__name__}"
                )
    return out  # type: ignore[return-value]
