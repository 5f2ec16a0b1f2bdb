"""What the editing methods share: an edit's inputs and results, chunk packing, the batch's row layout,
one denoising step of a chunk, and the decode into results. Plain functions; each method's own file
(:mod:`editing.pnp`, :mod:`editing.p2p`) writes its loop out with them.

Batch layout of one UNet call (one "chunk"; several source images may share it):

    [ src_g0, u_g0t0, c_g0t0, u_g0t1, c_g0t1, ..., src_g1, u_g1t0, c_g1t0, ... ]

`src_g` is group g's source row: its latent is the inversion trajectory z*_k at the current level and its
text the source prompt (PnP with ``source_text="empty"``: the empty prompt, as the published codes; no
guidance: Direct Inversion makes the source branch equal the trajectory, so its own guided update is never
needed); it exists only to provide the attention maps (P2P) or the features and queries/keys (PnP) that
the target rows take, and its output is discarded. With cached PnP features there is no source row at
all. `u`/`c` are each target's unconditional (negative prompt) and conditional rows, combined by
classifier-free guidance. Targets per chunk are at most `max_batch`; a group with more targets is split
over chunks (each chunk then runs that group's source row again).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from editing.configs import P2PConfig, PnPConfig
from editing.ddim import Schedule, denoise_step, guide, make_schedule
from editing.inversion import Inversion, NonFiniteError
from editing.model import EditModel, padded_rows  # noqa: F401 (editing.batching.padded_rows)

if TYPE_CHECKING:
    from editing.pnp import PnPFeatures


@dataclass(frozen=True)
class Target:
    """One wanted edit of a source image."""

    prompt: str
    config: PnPConfig | P2PConfig = field(default_factory=PnPConfig)
    edit_id: str | None = None
    seed: int | None = None  # editing is deterministic (DDIM, eta = 0); kept for provenance


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
    # {"source": share of the source row's evaluations, "target": 2T, "padding": share of the padding
    # rows' evaluations (only when the chunk was padded)}
    unet_evals: dict[str, float]
    seconds: float  # this edit's share of the chunk's wall time
    features: PnPFeatures | None = None  # recorded source features (record_features=True, PnP)


# ---------------------------------------------------------------- chunking


@dataclass(frozen=True)
class Piece:
    """The part of one source group that a chunk edits: some of its targets."""

    group_index: int  # the group's index in the method's input
    group: SourceGroup
    target_indices: tuple[int, ...]  # indices into group.targets

    @property
    def targets(self) -> list[Target]:
        return [self.group.targets[ti] for ti in self.target_indices]


def pack_chunks(
    groups: Sequence[SourceGroup], max_batch: int, key: Callable[[int, SourceGroup, int], Any]
) -> list[list[Piece]]:
    """Pack groups' targets into chunks of at most `max_batch` targets that share the inversion's steps
    and latent shape and `key(group index, group, target index)` (the method and its chunk key).

    Group by group, each group's targets of one key in parts of at most `max_batch`; a part joins the open
    chunk of its key if it fits, else closes it and opens the next (a part is never split further)."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    open_chunks: dict[Any, list[Piece]] = {}
    done: list[list[Piece]] = []
    for gi, group in enumerate(groups):
        by_key: dict[Any, list[int]] = {}
        for ti in range(len(group.targets)):
            k = (group.inversion.num_steps, group.inversion.latent_shape, key(gi, group, ti))
            by_key.setdefault(k, []).append(ti)
        for k, idxs in by_key.items():
            for start in range(0, len(idxs), max_batch):
                part = tuple(idxs[start : start + max_batch])
                chunk = open_chunks.setdefault(k, [])
                if chunk and chunk_size(chunk) + len(part) > max_batch:
                    done.append(chunk)
                    chunk = open_chunks[k] = []
                chunk.append(Piece(gi, group, part))
    done.extend(chunk for chunk in open_chunks.values() if chunk)
    return done


def chunk_size(pieces: Sequence[Piece]) -> int:
    """The number of targets of a chunk."""
    return sum(len(p.target_indices) for p in pieces)


def chunk_targets(pieces: Sequence[Piece]) -> list[Target]:
    """A chunk's targets in chunk order (piece by piece)."""
    return [t for p in pieces for t in p.targets]


# ---------------------------------------------------------------- row layout


@dataclass(frozen=True)
class RowLayout:
    """The one description of a chunk's batch rows (host-side; see the module docstring for the order):
    per row what it is and what it takes, and where each piece's and target's rows are."""

    live: bool  # the chunk runs source rows (False: cached PnP features replace them)
    src: tuple[int, ...]  # per row: the source row it takes from; -1 for a source row or a replay
    group: tuple[int, ...]  # per row: its piece
    target: tuple[
        bool, ...
    ]  # per row: PnP injects into it (cond. targets; uncond. with inject_uncond)
    cond_target: tuple[bool, ...]  # per row: a conditional target row (P2P edits only these)
    feature_steps: tuple[int, ...]  # per row: PnP residual injection while step < this
    attn_steps: tuple[int, ...]  # per row: PnP q/k injection, P2P self-attention replacement
    src_rows: tuple[int, ...]  # per piece: its source row; empty when replaying
    u_rows: tuple[int, ...]  # per target (chunk order): its unconditional row
    c_rows: tuple[int, ...]  # per target: its conditional row
    target_piece: tuple[int, ...]  # per target: its piece
    targets: tuple[Target, ...]

    padding: int = 0  # rows appended to reach a fixed batch shape (their outputs are discarded)

    @property
    def size(self) -> int:
        """The UNet's batch: every row, padding included."""
        return len(self.src)

    @property
    def real_rows(self) -> int:
        return self.size - self.padding


def layout_rows(
    pieces: Sequence[Piece],
    live: bool,
    *,
    feature_steps: Sequence[int] | None = None,
    attn_steps: Sequence[int] | None = None,
    inject_uncond: Sequence[bool] | None = None,
    pad: bool = False,
) -> RowLayout:
    """Lay out a chunk's rows: per piece its source row (when `live`), then per target its unconditional
    and conditional rows. Per target (chunk order): its PnP residual injection steps, its q/k injection
    (P2P: self-attention replacement) steps, whether its unconditional row is controlled too. `pad`:
    append padding rows up to :func:`padded_rows` (they take and give nothing; outputs discarded)."""
    targets = tuple(chunk_targets(pieces))
    n = len(targets)
    feature_steps = feature_steps or [0] * n
    attn_steps = attn_steps or [0] * n
    inject_uncond = inject_uncond or [False] * n
    cols: dict[str, list] = {k: [] for k in ("src", "group", "target", "cond", "feat", "attn")}

    def add(src: int, group: int, target: bool, cond: bool, feat: int, attn: int) -> int:
        for k, v in zip(cols, (src, group, target, cond, feat, attn)):
            cols[k].append(v)
        return len(cols["src"]) - 1

    src_rows, u_rows, c_rows, target_piece = [], [], [], []
    for pi, piece in enumerate(pieces):
        s = add(-1, pi, False, False, 0, 0) if live else -1
        if live:
            src_rows.append(s)
        for _ in piece.target_indices:
            j = len(target_piece)
            fs, at = feature_steps[j], attn_steps[j]
            u_rows.append(add(s, pi, inject_uncond[j], False, fs, at))
            c_rows.append(add(s, pi, True, True, fs, at))
            target_piece.append(pi)
    real = len(cols["src"])
    for _ in range(padded_rows(real) - real if pad else 0):
        add(-1, 0, False, False, 0, 0)
    return RowLayout(
        live=live,
        src=tuple(cols["src"]),
        group=tuple(cols["group"]),
        target=tuple(cols["target"]),
        cond_target=tuple(cols["cond"]),
        feature_steps=tuple(cols["feat"]),
        attn_steps=tuple(cols["attn"]),
        src_rows=tuple(src_rows),
        u_rows=tuple(u_rows),
        c_rows=tuple(c_rows),
        target_piece=tuple(target_piece),
        targets=targets,
        padding=len(cols["src"]) - real,
    )


def latent_positions(pieces: Sequence[Piece]) -> int:
    """h * w of the chunk's latents (the same for every piece: part of the chunk key)."""
    shape = pieces[0].group.inversion.latent_shape
    return int(shape[-1] * shape[-2])


# ---------------------------------------------------------------- the UNet call


@dataclass(frozen=True)
class ChunkBatch:
    """One chunk's UNet inputs, made once before its loop, on the UNet's device."""

    layout: RowLayout
    steps: int
    schedule: Schedule
    timesteps: torch.Tensor  # (T,)
    embeddings: torch.Tensor  # (B, L, D) the text of every row
    trajectory: torch.Tensor  # (P, T+1, C, h, w) each piece's inversion latents
    corrections: torch.Tensor  # (P, T, C, h, w) each piece's Direct Inversion corrections
    target_piece: torch.Tensor  # (n,) long
    correct: (
        torch.Tensor
    )  # (n,) 1 where the target adds its source's corrections (target_correction)
    scales: torch.Tensor  # (n,) guidance scales
    src_rows: torch.Tensor  # (P,) long, empty when replaying
    u_rows: torch.Tensor  # (n,) long
    c_rows: torch.Tensor  # (n,) long
    unet_input: torch.Tensor  # (B, C, h, w) scratch, refilled every step

    def start_latents(self) -> torch.Tensor:
        """Every target's z_T: its source's inverted latent (n, C, h, w)."""
        return self.trajectory[self.target_piece, self.steps].clone()

    def source_latents(self, level: int) -> torch.Tensor:
        """Every target's source trajectory latent at `level` (n, C, h, w)."""
        return self.trajectory[self.target_piece, level]


def make_batch(
    model: EditModel,
    pieces: Sequence[Piece],
    layout: RowLayout,
    empty_source: Sequence[bool] | None = None,
) -> ChunkBatch:
    """Encode the rows' texts and put the chunk's latents and per-target numbers on the UNet's device;
    `empty_source[p]`: piece p's source row sees the empty prompt (PnP source_text="empty")."""
    dev = model.device
    steps = pieces[0].group.inversion.num_steps
    schedule = make_schedule(model.scheduler, steps)
    traj = torch.stack([p.group.inversion.latents for p in pieces]).to(dev)
    corr = torch.stack([p.group.inversion.corrections for p in pieces]).to(dev)
    targets = layout.targets
    return ChunkBatch(
        layout=layout,
        steps=steps,
        schedule=schedule,
        timesteps=schedule.timesteps_on(dev),
        embeddings=_row_embeddings(model, pieces, layout, empty_source),
        trajectory=traj,
        corrections=corr,
        target_piece=torch.tensor(layout.target_piece, device=dev),
        correct=torch.tensor(
            [t.config.target_correction for t in targets], device=dev, dtype=traj.dtype
        ),
        scales=torch.tensor([t.config.guidance_scale for t in targets], device=dev),
        src_rows=torch.tensor(layout.src_rows, device=dev, dtype=torch.long),
        u_rows=torch.tensor(layout.u_rows, device=dev),
        c_rows=torch.tensor(layout.c_rows, device=dev),
        # zeros: padding rows keep a finite input (their outputs are never read)
        unet_input=torch.zeros((layout.size, *traj.shape[2:]), device=dev, dtype=traj.dtype),
    )


def _row_embeddings(
    model: EditModel,
    pieces: Sequence[Piece],
    layout: RowLayout,
    empty_source: Sequence[bool] | None,
) -> torch.Tensor:
    emb: list[torch.Tensor | None] = [None] * layout.size
    empty = None  # the "" embedding, encoded once per chunk when a source row needs it
    for pi, row in enumerate(layout.src_rows):
        if empty_source is not None and empty_source[pi]:
            empty = model.encode_prompts([""])[0] if empty is None else empty
            emb[row] = empty
        else:
            emb[row] = pieces[pi].group.inversion.cond.to(model.device, model.dtype)
    neg = model.encode_prompts([t.config.negative_prompt for t in layout.targets])
    pos = model.encode_prompts([t.prompt for t in layout.targets])
    for j, (u, c) in enumerate(zip(layout.u_rows, layout.c_rows)):
        emb[u], emb[c] = neg[j], pos[j]
    for r in range(layout.real_rows, layout.size):  # padding rows: the first target's negative text
        emb[r] = neg[0]
    return torch.stack(emb)


def denoise_level(model: EditModel, batch: ChunkBatch, z: torch.Tensor, level: int) -> torch.Tensor:
    """One UNet call of the whole chunk and every target's DDIM step level -> level - 1 (with its
    Direct Inversion correction when asked); the source rows run on the trajectory, their output unused."""
    x = batch.unet_input
    if batch.layout.live:
        x[batch.src_rows] = batch.trajectory[:, level]
    x[batch.u_rows], x[batch.c_rows] = z, z
    out = model.unet(
        x.to(model.dtype), batch.timesteps[level - 1], encoder_hidden_states=batch.embeddings
    ).sample
    guided = guide(out[batch.u_rows], out[batch.c_rows], batch.scales)
    correction = batch.corrections[batch.target_piece, level - 1]
    return (
        denoise_step(guided, z, batch.schedule, level)
        + batch.correct.view(-1, 1, 1, 1) * correction
    )


def check_finite(finite: torch.Tensor) -> None:
    """After the loop (one read back): raise on the first step whose latents were not finite."""
    if not bool(finite.all()):
        i = int(torch.nonzero(~finite)[0])
        steps = int(finite.shape[0])
        raise NonFiniteError(f"non-finite latents at step {i} (level {steps - i}); try fp32")


# ---------------------------------------------------------------- decode


def chunk_results(
    model: EditModel,
    pieces: Sequence[Piece],
    layout: RowLayout,
    z: torch.Tensor,
    method: str,
    *,
    start: float,
    features: Sequence[PnPFeatures] | None = None,
) -> list[EditResult]:
    """Decode the final latents into one result per target (chunk order); `start` is the chunk's
    perf_counter start, `features` the recorded PnP features per piece."""
    images = model.decode_latents(z)
    seconds = (time.perf_counter() - start) / len(layout.targets)
    steps = pieces[0].group.inversion.num_steps
    source_evals = steps if layout.live else 0
    padding_evals = layout.padding * steps / len(layout.targets)
    return [
        EditResult(
            edit_id=t.edit_id,
            prompt=t.prompt,
            method=method,
            image=images[j],
            latent=z[j].cpu(),
            unet_evals={
                "source": source_evals / len(pieces[pi].target_indices),
                "target": 2 * steps,
                # padding rows' evaluations: waste, shared by the chunk's targets
                **({"padding": padding_evals} if layout.padding else {}),
            },
            seconds=seconds,
            features=features[pi] if features else None,
        )
        for j, (t, pi) in enumerate(zip(layout.targets, layout.target_piece))
    ]
