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
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

if TYPE_CHECKING:
    from editing.batching import RowLayout

PROC_SUFFIX = ".processor"


@dataclass(frozen=True)
class StepMask:
    """Per step, the batch rows one control acts on: a fixed-shape mask indexed by the step tensor on the
    device, so that a compiled UNet sees the same graph at every step (no per-step Python values)."""

    mask: torch.Tensor  # (T, B) bool
    steps: tuple[bool, ...]  # host-side, per step: whether any row is acted on (recording, reports)
    # host-side: whether any row is acted on at any step (what the processors branch on: a compiled
    # graph guards on this one bool, not on the per-step tuple, which differs from chunk to chunk)
    any: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "any", any(self.steps))

    def at(self, step: torch.Tensor, ndim: int) -> torch.Tensor:
        """The rows acted on at `step` (the (1,) step tensor), shaped to broadcast over a (B, ...) tensor
        of `ndim` dimensions."""
        return self.mask[step].view(-1, *([1] * (ndim - 1)))

    def any_at(self, step: torch.Tensor) -> torch.Tensor:
        """Whether any row is acted on at `step`: a 0-dim bool tensor on the device (never read back)."""
        return self.mask[step].any()


@dataclass(frozen=True)
class CrossControl:
    """Prompt-to-Prompt's cross-attention edit of the conditional target rows, on the UNet's device.

    Its `rows` have a fixed length (half the batch, at least the chunk's targets): the entries past the
    targets repeat row 0 with a zero schedule weight, so they write that row's own maps back unchanged."""

    rows: torch.Tensor  # (K,) long; the edited rows
    src: torch.Tensor  # (K,) long; the source row of each
    mapper: torch.Tensor  # (K, L, L) in the model's dtype
    alpha: torch.Tensor  # (K, 1, 1, L)
    equalizer: torch.Tensor  # (K, 1, 1, L)
    weight: torch.Tensor  # (T, K, 1, 1, L): per step, the cross-replace schedule
    active: tuple[bool, ...]  # per step: whether any weight is non-zero (host-side)
    any_active: bool = False  # whether any step is active (host-side; what the processors read)

    def __post_init__(self) -> None:
        object.__setattr__(self, "any_active", any(self.active))


@dataclass(frozen=True)
class ChunkPlan:
    """Everything the processors and hooks read, made once per chunk by :meth:`place` on the UNet's
    device and never changed: per step the rows of each control (masks indexed by the step tensor),
    Prompt-to-Prompt's cross-attention control, the replayed features. Only the step tensor
    (:attr:`ControlState.step`) moves in the loop, so the loop does no host round trip (no `.cpu()`,
    `.item()`, host `nonzero` or `bool(tensor)`) and every tensor's shape depends on the batch shape and
    the step count only (one compiled graph per padded shape and method)."""

    device: torch.device
    latent_positions: int  # h * w of the latent (for resolution-relative layer choices)
    src: torch.Tensor  # (B,) long; per row the source row it takes from (itself when none)
    group: torch.Tensor  # (B,) long; per row its piece (the cached features it takes)
    feature: StepMask  # PnP residual injection (target rows)
    attn: StepMask  # PnP q/k injection (target rows)
    self_attn: StepMask  # P2P self-attention replacement (conditional target rows)
    source_rows: torch.Tensor  # (G,) long; each piece's source row (empty when replaying)
    cross: CrossControl | None = None  # P2P cross-attention
    # cached source features by "{layer}.{q|k|conv2}" -> (S, G, ...), S the recorded steps (0..S-1);
    # None: live source rows
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
        """Derive every per-step mask and schedule from the host-side row layout `rows`
        (:class:`editing.batching.RowLayout`) and put them, Prompt-to-Prompt's `cross` tensors
        (mapper, alpha, equalizer, schedule; one row per batch row) and any replayed features
        ("{layer}.{kind}@{step}" -> (G, ...), in `dtype`) on `device`; once per chunk, before the loop."""
        device = torch.device(device)
        b = rows.size
        src = torch.tensor([s if s >= 0 else r for r, s in enumerate(rows.src)], dtype=torch.long)
        target, cond = torch.tensor(rows.target), torch.tensor(rows.cond_target)
        level = torch.arange(steps)[:, None]  # (T, 1)
        feature_steps, attn_steps = torch.tensor(rows.feature_steps), torch.tensor(rows.attn_steps)

        def mask(m: torch.Tensor) -> StepMask:  # (T, B) on the host
            return StepMask(m.to(device), tuple(bool(x) for x in m.any(1)))

        control = None
        if cross is not None:
            r = torch.nonzero(cond).flatten()  # the conditional target rows, on the host
            k = max(b // 2, len(r))
            fill = k - len(r)  # entries that repeat row 0 with a zero weight: a fixed length

            def pad(t: torch.Tensor) -> torch.Tensor:
                return torch.cat([t, t[:1].expand(fill, *t.shape[1:])]) if fill else t

            def cols(t: torch.Tensor) -> torch.Tensor:  # (K, L) -> (K, 1, 1, L) on device
                return t.to(device, dtype)[:, None, None, :]

            sched = cross["schedule"][r]  # (n, T, L)
            weight = torch.cat([sched, sched.new_zeros(fill, *sched.shape[1:])])  # (K, T, L)
            rows_k = torch.cat([r, r.new_zeros(fill)])
            control = CrossControl(
                rows=rows_k.to(device),
                src=src[rows_k].to(device),
                mapper=pad(cross["mapper"][r]).to(device, dtype),
                alpha=cols(pad(cross["alpha"][r])),
                equalizer=cols(pad(cross["equalizer"][r])),
                weight=weight.transpose(0, 1).to(device, dtype)[:, :, None, None, :],
                active=tuple(bool((sched[:, i] > 0).any()) for i in range(steps)),
            )
        return cls(
            device=device,
            latent_positions=latent_positions,
            src=src.to(device),
            group=torch.tensor(rows.group, dtype=torch.long).to(device),
            feature=mask(target & (level < feature_steps)),
            attn=mask(target & (level < attn_steps)),
            self_attn=mask(cond & (level < attn_steps)),
            source_rows=torch.tensor(rows.src_rows, dtype=torch.long).to(device),
            cross=control,
            replay=None if replay is None else _stack_replay(replay, device, dtype),
            self_max_positions=self_max_positions,
            blend_positions=blend_positions,
        )

    def check_replay(self, key: str, needed: StepMask) -> None:
        """Refuse, before the loop, cached features that lack a step the chunk injects `key` at."""
        have = 0 if self.replay is None or key not in self.replay else self.replay[key].shape[0]
        last = max((i for i, on in enumerate(needed.steps) if on), default=-1)
        if last >= have:
            raise KeyError(
                f"cached features lack {f'{key}@{last}'!r}; the cache was made with other settings"
            )


def _stack_replay(
    replay: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """ "{layer}.{kind}@{step}" -> (G, ...) as "{layer}.{kind}" -> (S, G, ...) over steps 0..S-1 (a
    recording holds the first S steps of each key; a gap ends it), on `device` in `dtype`."""
    per_key: dict[str, dict[int, torch.Tensor]] = {}
    for full_key, t in replay.items():
        key, _, step = full_key.rpartition("@")
        per_key.setdefault(key, {})[int(step)] = t
    out = {}
    for key, by_step in per_key.items():
        n = 0
        while n in by_step:
            n += 1
        out[key] = torch.stack([by_step[i] for i in range(n)]).to(device, dtype)
    return out


@dataclass
class StepOutputs:
    """What the processors and hooks write while a chunk runs (kept apart from the plan they read)."""

    # when a dict, live source features are saved into it (on the device, fp16): per
    # "{layer}.{q|k|conv2}" one tensor per step (a row per piece); see :meth:`recorded`
    record: dict[str, list[torch.Tensor]] | None = None
    # this step's recording: the processors write a fresh dict each step (so a compiled UNet sees the
    # same empty dict at every step, not a list that grows), moved into `record` by :meth:`new_step`
    step_record: dict[str, torch.Tensor] = field(default_factory=dict)
    blend_sum: torch.Tensor | None = None  # (B, Q, L) this step's summed local-blend maps
    blend_count: int = 0  # how many layers were summed into blend_sum this step
    acted: set[str] = field(default_factory=set)  # layers that changed something (tests/reports)

    def new_step(self) -> None:
        """Forget the previous step's local-blend maps; keep its recording."""
        self.blend_sum, self.blend_count = None, 0
        if self.record is not None:
            for key, t in self.step_record.items():
                # a copy: a CUDA-graph replay reuses its output buffers at the next step
                self.record.setdefault(key, []).append(t.clone())
        self.step_record = {}

    def recorded(self, plan: ChunkPlan) -> dict[str, torch.Tensor]:
        """The recording as "{layer}.{kind}@{step}" -> (G, ...) for the steps that injected it."""
        self.new_step()
        out = {}
        for key, per_step in (self.record or {}).items():
            steps = (plan.feature if key.endswith(".conv2") else plan.attn).steps
            out |= {f"{key}@{i}": t for i, t in enumerate(per_step) if steps[i]}
        return out


@dataclass
class ControlState:
    """What the processors see: the chunk's (immutable, placed) plan, the step the loop is at (a (1,)
    long tensor on the plan's device, filled in place: the one thing that changes) and the outputs.

    The step is a 1-element tensor, not a 0-dim one: indexing with a 0-dim integer tensor reads it back
    to the host (it counts as a Python int); a 1-element index is a gather on the device."""

    plan: ChunkPlan
    outputs: StepOutputs = field(default_factory=StepOutputs)
    step: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.step is None and isinstance(self.plan, ChunkPlan):
            self.step = torch.zeros(1, dtype=torch.long, device=self.plan.device)

    def set_step(self, i: int) -> None:
        """Tell the processors the loop is at step `i` (no host read; the same tensor every step)."""
        self.step.fill_(i)

    def take(self, key: str, tensor: torch.Tensor, on: StepMask) -> torch.Tensor:
        """`tensor` (B, ...) with the rows `on` acts on at this step replaced by their source's `key`
        feature: from the batch's source rows, or from the cache (recording the source rows' when asked)."""
        plan = self.plan
        if plan.replay is not None:
            cached = plan.replay[key]  # (S, G, ...); masked-off steps past S read step S-1, unused
            source = cached[self.step.clamp(max=cached.shape[0] - 1)][0, plan.group]
        else:
            if self.outputs.record is not None:  # every step; stays on the device
                self.outputs.step_record[key] = tensor[plan.source_rows].detach().to(torch.float16)
            source = tensor[plan.src]
        return torch.where(on.at(self.step, tensor.ndim), source, tensor)

    def acted(self, name: str) -> None:
        """Note (eager runs only; nothing to trace) that layer `name` changed something in this chunk."""
        if not torch.compiler.is_compiling():
            self.outputs.acted.add(name)


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
        on = st.plan.attn
        if on.any:  # host-side, fixed for the chunk: the same graph at every step
            q = st.take(f"{self.name}.q", q, on)
            k = st.take(f"{self.name}.k", k, on)
            st.acted(self.name)
        out = F.scaled_dot_product_attention(_heads(attn, q), _heads(attn, k), _heads(attn, v))
        return _finish(attn, out, residual, shape4)


class P2PAttnProcessor:
    """Prompt-to-Prompt: edits the conditional target rows' attention probabilities.

    Cross-attention: target maps = schedule * (mapped source maps * alpha + own * (1 - alpha)) * equalizer
    + (1 - schedule) * own. Self-attention (only at low resolutions): target maps = source maps while
    step < self-replace steps; at the steps where no row replaces, the layer's output is fused SDPA's
    (both are computed there and one is selected on the device, so that every step runs one graph).
    Layers where neither applies run fused SDPA.
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
        # host-side choices, fixed for the chunk
        edit_cross = self.is_cross and plan.cross is not None
        edit_self = (
            not self.is_cross and positions <= plan.self_max_positions and plan.self_attn.any
        )
        collect = self.is_cross and positions == plan.blend_positions
        qh, kh, vh = _heads(attn, q), _heads(attn, k), _heads(attn, v)
        if not (edit_cross or edit_self or collect):
            return _finish(attn, F.scaled_dot_product_attention(qh, kh, vh), residual, shape4)
        probs = (
            qh @ kh.transpose(-1, -2) * (attn.scale if attn.scale else 1 / math.sqrt(qh.shape[-1]))
        ).softmax(-1)
        if collect:
            self._collect(probs)
        if edit_cross:
            cross = plan.cross
            src, own = probs[cross.src], probs[cross.rows]  # (K, heads, Q, L)
            w = cross.weight[st.step][0]  # (K, 1, 1, L); 0 where (or when) a row takes nothing
            a = cross.alpha
            edited = torch.einsum("nhqs,nst->nhqt", src, cross.mapper) * a + own * (1 - a)
            probs = probs.index_put((cross.rows,), w * (edited * cross.equalizer) + (1 - w) * own)
            if cross.any_active:
                st.acted(self.name)
        elif edit_self:
            on = plan.self_attn
            probs = torch.where(on.at(st.step, probs.ndim), probs[plan.src], probs)
            fused = F.scaled_dot_product_attention(qh, kh, vh)
            out = torch.where(on.any_at(st.step), probs @ vh, fused)
            st.acted(self.name)
            return _finish(attn, out, residual, shape4)
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
        if not state.plan.feature.any:  # host-side, fixed for the chunk
            return None
        state.acted(name)
        return state.take(f"{name}.conv2", output, state.plan.feature)

    return hook


@contextlib.contextmanager
def controlled_unet(
    unet,
    state: ControlState,
    *,
    p2p: bool = False,
    pnp_attn_parents: tuple[str, ...] = (),
    pnp_feature_layers: tuple[str, ...] = (),
    sdpa: bool = True,
) -> Iterator[list[str]]:
    """Install the editing processors and hooks; yield the controlled layer names; restore in `finally`.

    P2P: every attention layer gets a :class:`P2PAttnProcessor` (cross ones edit maps, self ones replace
    at low resolution). PnP: attn1 of `pnp_attn_parents` get :class:`PnPSelfAttnProcessor`, and the conv2
    of each resnet in `pnp_feature_layers` a forward hook. All other layers: fused SDPA (`sdpa` False:
    diffusers' classic unfused processor, the lever's "off"). The state must
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
            procs[name + PROC_SUFFIX] = AttnProcessor2_0() if sdpa else AttnProcessor()
    if state.plan.replay is not None:  # before the loop: cached features must cover every step used
        for name in pnp_names:
            for kind in ("q", "k"):
                state.plan.check_replay(f"{name}.{kind}", state.plan.attn)
        for path in pnp_feature_layers:
            state.plan.check_replay(f"{path}.conv2", state.plan.feature)
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
