"""The one module that knows diffusers' attention internals: editing processors and feature hooks.

Attention behaviour changes only through ``unet.set_attn_processor`` (every layer gets a processor: the
controlled ones an editing processor, the rest a fused SDPA one) and residual features only through
``register_forward_hook``; :func:`controlled_unet` restores the UNet exactly as found, also on error.
The denoising loop tells the processors which step it is via :class:`ControlState`; nothing counts layers.
Each chunk's :class:`ChunkPlan` is made once, on the UNet's device; the processors' writes go to :class:`StepOutputs`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0

if TYPE_CHECKING:
    from editing.batching import RowLayout

PROC_SUFFIX = ".processor"


@dataclass(frozen=True)
class StepRows:
    """The rows one control acts on at one step and the rows they take from, on the UNet's device.

    `n` is known on the host, so processors branch on it without reading a device tensor back.
    """

    rows: torch.Tensor  # (n,) long; batch rows that are edited
    src: torch.Tensor  # (n,) long; the live source row of each
    group: torch.Tensor  # (n,) long; the cached-feature group (piece) of each
    n: int


@dataclass(frozen=True)
class CrossControl:
    """Prompt-to-Prompt's cross-attention edit of the conditional target rows, on the UNet's device."""

    rows: StepRows
    mapper: torch.Tensor  # (n, L, L) in the model's dtype
    alpha: torch.Tensor  # (n, 1, 1, L)
    equalizer: torch.Tensor  # (n, 1, 1, L)
    weight: tuple[torch.Tensor, ...]  # per step (n, 1, 1, L): the cross-replace schedule
    active: tuple[bool, ...]  # per step: whether any weight is non-zero (host-side)


@dataclass(frozen=True)
class ChunkPlan:
    """Everything the processors and hooks read, made once per chunk by :meth:`place` on the UNet's
    device and never changed: per step the rows of each control, Prompt-to-Prompt's cross-attention
    control, the replayed features. Only the step index (:attr:`ControlState.step`) moves in the loop,
    so the loop does no host round trip: no `.cpu()`, `.item()`, host `nonzero` or `bool(tensor)`.
    """

    device: torch.device
    latent_positions: int  # h * w of the latent (for resolution-relative layer choices)
    feature_rows: tuple[StepRows, ...]  # per step: PnP residual injection
    attn_rows: tuple[StepRows, ...]  # per step: PnP q/k injection (target rows)
    self_rows: tuple[StepRows, ...]  # per step: P2P self-attention replacement (cond. target rows)
    source_rows: torch.Tensor  # (G,) long; each piece's source row (empty when replaying)
    cross: CrossControl | None = None  # P2P cross-attention
    # cached source features by "{layer}.{q|k|conv2}@{step}" -> (G, ...); None: live source rows
    replay: dict[str, torch.Tensor] | None = None
    self_max_positions: int = 0  # P2P: replace self-attention only where query positions <= this
    # P2P: collect cross maps for local blend at layers with this many positions; -1: none
    blend_positions: int = -1

    @classmethod
    def place(
        cls,
        rows: RowLayout,
        steps: int,
        device: torch.device | str,
        dtype: torch.dtype,
        *,
        latent_positions: int,
        cross: dict[str, torch.Tensor] | None = None,
        replay: dict[str, torch.Tensor] | None = None,
        self_max_positions: int = 0,
        blend_positions: int = -1,
    ) -> ChunkPlan:
        """Derive every per-step index and schedule from the host-side row layout `rows`
        (:class:`editing.batching.RowLayout`) and put them, Prompt-to-Prompt's `cross` tensors
        (mapper, alpha, equalizer, schedule; one row per batch row) and any replayed features (in
        `dtype`) on `device`; once per chunk, before the loop."""
        device = torch.device(device)
        src, group = torch.tensor(rows.src), torch.tensor(rows.group)
        target, cond = torch.tensor(rows.target), torch.tensor(rows.cond_target)
        feature_steps, attn_steps = torch.tensor(rows.feature_steps), torch.tensor(rows.attn_steps)
        cache: dict[tuple[int, ...], StepRows] = {}

        def rows_where(mask: torch.Tensor) -> StepRows:
            idx = tuple(torch.nonzero(mask).flatten().tolist())  # host, before the loop
            if idx not in cache:
                t = torch.tensor(idx, dtype=torch.long)
                cache[idx] = StepRows(
                    t.to(device), src[t].to(device), group[t].to(device), len(idx)
                )
            return cache[idx]

        control = None
        if cross is not None:
            r = torch.nonzero(cond).flatten()  # the conditional target rows, on the host

            def cols(t: torch.Tensor) -> torch.Tensor:  # (n, L) -> (n, 1, 1, L) on device
                return t.to(device, dtype)[:, None, None, :]

            sched = cross["schedule"][r]  # (n, T, L)
            control = CrossControl(
                rows=rows_where(cond),
                mapper=cross["mapper"][r].to(device, dtype),
                alpha=cols(cross["alpha"][r]),
                equalizer=cols(cross["equalizer"][r]),
                weight=tuple(cols(sched[:, i]) for i in range(steps)),
                active=tuple(bool((sched[:, i] > 0).any()) for i in range(steps)),
            )
        return cls(
            device=device,
            latent_positions=latent_positions,
            feature_rows=tuple(rows_where(target & (i < feature_steps)) for i in range(steps)),
            attn_rows=tuple(rows_where(target & (i < attn_steps)) for i in range(steps)),
            self_rows=tuple(rows_where(cond & (i < attn_steps)) for i in range(steps)),
            source_rows=torch.tensor(rows.src_rows, dtype=torch.long).to(device),
            cross=control,
            replay=None if replay is None else {k: v.to(device, dtype) for k, v in replay.items()},
            self_max_positions=self_max_positions,
            blend_positions=blend_positions,
        )


@dataclass
class StepOutputs:
    """What the processors and hooks write while a chunk runs (kept apart from the plan they read)."""

    # when a dict, live source features are saved into it (on the device, fp16), one entry per
    # "{layer}.{q|k|conv2}@{step}" with a row per piece
    record: dict[str, torch.Tensor] | None = None
    blend_sum: torch.Tensor | None = None  # (B, Q, L) this step's summed local-blend maps
    blend_count: int = 0  # how many layers were summed into blend_sum this step
    acted: set[str] = field(default_factory=set)  # layers that changed something (tests/reports)

    def new_step(self) -> None:
        """Forget the previous step's local-blend maps."""
        self.blend_sum, self.blend_count = None, 0


@dataclass
class ControlState:
    """What the processors see: the chunk's (immutable, placed) plan, the step the loop is at (the one
    thing that changes) and the outputs they write."""

    plan: ChunkPlan
    outputs: StepOutputs = field(default_factory=StepOutputs)
    step: int = 0

    def source_for(self, key: str, tensor: torch.Tensor, sel: StepRows) -> torch.Tensor:
        """The source's `key` feature for the rows `sel`: from the batch's source rows, or from the cache."""
        plan, step = self.plan, self.step
        if plan.replay is not None:
            full_key = f"{key}@{step}"
            if full_key not in plan.replay:
                raise KeyError(
                    f"cached features lack {full_key!r}; the cache was made with other settings"
                )
            return plan.replay[full_key][sel.group]
        record = self.outputs.record
        if record is not None:  # one entry per piece, in piece order; stays on the device
            record[f"{key}@{step}"] = tensor[plan.source_rows].detach().to(torch.float16)
        return tensor[sel.src]


def tensors_in(obj, _seen: dict[int, object] | None = None) -> list[torch.Tensor]:
    """Every tensor reachable from `obj` through dataclass fields, dicts, lists and tuples (for checks)."""
    seen = (
        {} if _seen is None else _seen
    )  # id -> object: holding the object keeps its id from being reused
    if id(obj) in seen:
        return []
    seen[id(obj)] = obj
    if isinstance(obj, torch.Tensor):
        return [obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        children = [getattr(obj, f.name) for f in dataclasses.fields(obj)]
    elif isinstance(obj, dict):
        children = list(obj.values())
    elif isinstance(obj, (list, tuple, set)):
        children = list(obj)
    else:
        return []
    return [t for c in children for t in tensors_in(c, seen)]


def check_on_device(plan: ChunkPlan, device: torch.device | str) -> None:
    """Raise if any tensor of the chunk plan is not on `device` (called once per chunk)."""
    device = torch.device(device)
    bad = sorted({str(t.device) for t in tensors_in(plan) if not _same_device(t.device, device)})
    if bad:
        raise ValueError(f"control state has tensors on {bad}, the UNet is on {device}")


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    return a.index is None or b.index is None or a.index == b.index


def _project(attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None):
    """Shared pre-attention steps of diffusers' Attention: norms, q/k/v projections, head split."""
    if attn.spatial_norm is not None:
        raise NotImplementedError("spatial-norm attention is not used by SD 1.x/2.x UNets")
    shape4 = None
    if hidden_states.ndim == 4:
        shape4 = hidden_states.shape
        b, c, h, w = shape4
        hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
    if encoder_hidden_states is not None and attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)
    q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
    return q, k, v, shape4


def _heads(attn, x: torch.Tensor) -> torch.Tensor:
    b, n, d = x.shape
    return x.view(b, n, attn.heads, d // attn.heads).transpose(1, 2)  # (B, heads, N, d)


def _finish(attn, out: torch.Tensor, residual: torch.Tensor, shape4) -> torch.Tensor:
    b, heads, n, d = out.shape
    out = out.transpose(1, 2).reshape(b, n, heads * d)
    out = attn.to_out[1](attn.to_out[0](out))
    if shape4 is not None:
        out = out.transpose(-1, -2).reshape(shape4)
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor


class PnPSelfAttnProcessor:
    """Plug-and-Play: target rows take the source's self-attention queries and keys (not values)."""

    def __init__(self, name: str, state: ControlState):
        self.name, self.state = name, state

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        temb=None,
        **kwargs,
    ):
        if attention_mask is not None or encoder_hidden_states is not None:
            raise NotImplementedError(
                f"{self.name}: PnP injects into self-attention without masks only"
            )
        residual = hidden_states
        q, k, v, shape4 = _project(attn, hidden_states, None)
        st = self.state
        sel = st.plan.attn_rows[st.step]
        if sel.n:
            q, k = q.clone(), k.clone()
            q[sel.rows] = st.source_for(f"{self.name}.q", q, sel)
            k[sel.rows] = st.source_for(f"{self.name}.k", k, sel)
            st.outputs.acted.add(self.name)
        out = F.scaled_dot_product_attention(_heads(attn, q), _heads(attn, k), _heads(attn, v))
        return _finish(attn, out, residual, shape4)


class P2PAttnProcessor:
    """Prompt-to-Prompt: edits the conditional target rows' attention probabilities.

    Cross-attention: target maps = schedule * (mapped source maps * alpha + own * (1 - alpha)) * equalizer
    + (1 - schedule) * own. Self-attention (only at low resolutions): target maps = source maps while
    step < self-replace steps. Layers where neither applies at this step run fused SDPA.
    """

    def __init__(self, name: str, state: ControlState, is_cross: bool):
        self.name, self.state, self.is_cross = name, state, is_cross

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        temb=None,
        **kwargs,
    ):
        if attention_mask is not None:
            raise NotImplementedError(
                f"{self.name}: attention masks are not supported by Prompt-to-Prompt"
            )
        residual = hidden_states
        q, k, v, shape4 = _project(attn, hidden_states, encoder_hidden_states)
        st, plan = self.state, self.state.plan
        positions = q.shape[1]
        if self.is_cross:
            sel = plan.cross.rows
            collect = positions == plan.blend_positions
        else:
            sel = plan.self_rows[st.step] if positions <= plan.self_max_positions else None
            collect = False
        qh, kh, vh = _heads(attn, q), _heads(attn, k), _heads(attn, v)
        if not (sel is not None and sel.n) and not collect:
            return _finish(attn, F.scaled_dot_product_attention(qh, kh, vh), residual, shape4)
        probs = (
            qh @ kh.transpose(-1, -2) * (attn.scale if attn.scale else 1 / math.sqrt(qh.shape[-1]))
        ).softmax(-1)
        if collect:
            self._collect(probs)
        if sel is not None and sel.n:
            src = probs[sel.src]  # (n, heads, Q, K)
            if self.is_cross:
                cross = plan.cross
                if cross.active[st.step]:
                    own = probs[sel.rows]
                    w = cross.weight[st.step]  # (n, 1, 1, L)
                    a = cross.alpha
                    edited = torch.einsum("nhqs,nst->nhqt", src, cross.mapper) * a + own * (1 - a)
                    probs = probs.clone()
                    probs[sel.rows] = w * (edited * cross.equalizer) + (1 - w) * own
                    st.outputs.acted.add(self.name)
            else:
                probs = probs.clone()
                probs[sel.rows] = src
                st.outputs.acted.add(self.name)
        return _finish(attn, probs @ vh, residual, shape4)

    def _collect(self, probs: torch.Tensor) -> None:
        out = self.state.outputs
        maps = probs.mean(1).float()  # (B, Q, L), averaged over heads
        out.blend_sum = maps if out.blend_sum is None else out.blend_sum + maps
        out.blend_count += 1


def attention_layer_names(unet) -> list[str]:
    """Names (without the '.processor' suffix) of every attention layer, e.g. '...attn1'."""
    return [k[: -len(PROC_SUFFIX)] for k in unet.attn_processors]


def self_attention_names(unet, parents: tuple[str, ...]) -> list[str]:
    """The attn1 layers inside each of `parents` (e.g. 'up_blocks.2.attentions.0', or an attn1 path itself);
    a path matching none is an error."""
    names = attention_layer_names(unet)
    out = []
    for parent in parents:
        found = [
            n for n in names if (n == parent or n.startswith(parent + ".")) and n.endswith(".attn1")
        ]
        if not found:
            raise ValueError(f"no self-attention layer under {parent!r} in this UNet")
        out.extend(found)
    return out


def _feature_hook(name: str, state: ControlState):
    def hook(module, args, output):
        sel = state.plan.feature_rows[state.step]
        if not sel.n:
            return None
        output = output.clone()
        output[sel.rows] = state.source_for(f"{name}.conv2", output, sel)
        state.outputs.acted.add(name)
        return output

    return hook


@contextlib.contextmanager
def controlled_unet(
    unet,
    state: ControlState,
    *,
    p2p: bool = False,
    pnp_attn_parents: tuple[str, ...] = (),
    pnp_feature_layers: tuple[str, ...] = (),
) -> Iterator[list[str]]:
    """Install the editing processors and hooks; yield the controlled layer names; restore in `finally`.

    P2P: every attention layer gets a :class:`P2PAttnProcessor` (cross ones edit maps, self ones replace
    at low resolution). PnP: attn1 of `pnp_attn_parents` get :class:`PnPSelfAttnProcessor`, and the conv2
    of each resnet in `pnp_feature_layers` a forward hook. All other layers: fused SDPA. The state must
    have a plan placed (:meth:`ChunkPlan.place`) on the UNet's device; anything elsewhere is an error here,
    before the loop, rather than a device mismatch deep inside it.
    """
    if not isinstance(state.plan, ChunkPlan):
        raise ValueError(
            "the state needs a ChunkPlan.place(...) plan before processors are installed"
        )
    check_on_device(state.plan, unet.device)
    original = dict(unet.attn_processors)
    names = attention_layer_names(unet)
    pnp_names = set(self_attention_names(unet, pnp_attn_parents)) if pnp_attn_parents else set()
    procs: dict[str, object] = {}
    controlled: list[str] = []
    for name in names:
        if p2p:
            procs[name + PROC_SUFFIX] = P2PAttnProcessor(
                name, state, is_cross=name.endswith("attn2")
            )
            controlled.append(name)
        elif name in pnp_names:
            procs[name + PROC_SUFFIX] = PnPSelfAttnProcessor(name, state)
            controlled.append(name)
        else:
            procs[name + PROC_SUFFIX] = AttnProcessor2_0()
    handles = []
    try:
        for path in pnp_feature_layers:
            try:
                conv2 = unet.get_submodule(path).conv2
            except AttributeError as exc:
                raise ValueError(f"no resnet with a conv2 at {path!r} in this UNet") from exc
            handles.append(conv2.register_forward_hook(_feature_hook(path, state)))
            controlled.append(path)
        unet.set_attn_processor(dict(procs))
        yield controlled
    finally:
        for h in handles:
            h.remove()
        unet.set_attn_processor(dict(original))
