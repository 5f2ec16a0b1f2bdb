"""The one module that knows diffusers' attention internals: editing processors and feature hooks.

Attention behaviour changes only through ``unet.set_attn_processor`` (every layer gets a processor: the
controlled ones an editing processor, the rest a fused SDPA one) and residual features only through
``register_forward_hook``; :func:`controlled_unet` restores the UNet exactly as found, also on error.
The denoising loop tells the processors which step it is via :class:`ControlState`; nothing counts layers.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0

PROC_SUFFIX = ".processor"


@dataclass
class RowPlan:
    """Per batch-row roles. B rows; `src[b]` is the row (live) or group (replay) row b copies from."""

    src: torch.Tensor  # (B,) long; -1 for rows that take nothing (source rows)
    group: torch.Tensor  # (B,) long; the source group of each row
    source_rows: torch.Tensor  # (G,) long; the source row of each group (empty when replaying a cache)
    cond_target: torch.Tensor  # (B,) bool; conditional target rows (P2P edits only these)
    target: torch.Tensor  # (B,) bool; rows PnP injects into (conditional targets, optionally unconditional)
    feature_steps: torch.Tensor  # (B,) long; PnP residual injection while step < this
    attn_steps: torch.Tensor  # (B,) long; PnP q/k injection / P2P self-attention replacement while step < this
    # Prompt-to-Prompt only, (B, ...) rows of non-cond-target rows are unused:
    mapper: torch.Tensor | None = None  # (B, L, L)
    alpha: torch.Tensor | None = None  # (B, L)
    equalizer: torch.Tensor | None = None  # (B, L)
    cross_schedule: torch.Tensor | None = None  # (B, T, L)


@dataclass
class ControlState:
    """What the processors read each step; the loop sets `step` before every UNet call."""

    plan: RowPlan
    latent_positions: int  # h * w of the latent (for resolution-relative layer choices)
    step: int = 0
    replay: dict[str, torch.Tensor] | None = None  # cached source features by key -> (G, ...); no source rows
    record: dict[str, torch.Tensor] | None = None  # when a dict, live source features are saved into it
    self_max_positions: int = 0  # P2P: replace self-attention only where query positions <= this
    blend_positions: int = -1  # P2P: collect cross maps for local blend at layers with this many positions
    blend_sum: torch.Tensor | None = None  # (B, Q, L) summed maps of this step
    blend_count: int = 0
    acted: set[str] = field(default_factory=set)  # layer names that changed something (for tests/reports)

    def rows(self, steps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.nonzero(mask & (self.step < steps), as_tuple=False).flatten()

    def source_for(self, key: str, tensor: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The source's `key` feature for `rows`: from the batch's source rows, or from the cache."""
        if self.replay is not None:
            full_key = f"{key}@{self.step}"
            if full_key not in self.replay:
                raise KeyError(f"cached features lack {full_key!r}; the cache was made with other settings")
            cached = self.replay[full_key].to(tensor.device, tensor.dtype)
            return cached[self.plan.group[rows].to(cached.device)]
        if self.record is not None:  # one entry per group, in group order
            source = tensor[self.plan.source_rows.to(tensor.device)]
            self.record[f"{key}@{self.step}"] = source.detach().to("cpu", torch.float16)
        return tensor[self.plan.src[rows].to(tensor.device)]


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

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if attention_mask is not None or encoder_hidden_states is not None:
            raise NotImplementedError(f"{self.name}: PnP injects into self-attention without masks only")
        residual = hidden_states
        q, k, v, shape4 = _project(attn, hidden_states, None)
        st = self.state
        rows = st.rows(st.plan.attn_steps.to(q.device), st.plan.target.to(q.device))
        if rows.numel():
            q, k = q.clone(), k.clone()
            q[rows] = st.source_for(f"{self.name}.q", q, rows)
            k[rows] = st.source_for(f"{self.name}.k", k, rows)
            st.acted.add(self.name)
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

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if attention_mask is not None:
            raise NotImplementedError(f"{self.name}: attention masks are not supported by Prompt-to-Prompt")
        residual = hidden_states
        q, k, v, shape4 = _project(attn, hidden_states, encoder_hidden_states)
        st, plan = self.state, self.state.plan
        positions = q.shape[1]
        dev = q.device
        if self.is_cross:
            rows = torch.nonzero(plan.cond_target, as_tuple=False).flatten().to(dev)
            collect = positions == st.blend_positions
        else:
            rows = (
                st.rows(plan.attn_steps.to(dev), plan.cond_target.to(dev))
                if positions <= st.self_max_positions
                else rows_none(dev)
            )
            collect = False
        qh, kh, vh = _heads(attn, q), _heads(attn, k), _heads(attn, v)
        if not rows.numel() and not collect:
            return _finish(attn, F.scaled_dot_product_attention(qh, kh, vh), residual, shape4)
        probs = (qh @ kh.transpose(-1, -2) * (attn.scale if attn.scale else 1 / math.sqrt(qh.shape[-1]))).softmax(-1)
        if collect:
            self._collect(probs)
        if rows.numel():
            src = probs[plan.src[rows].to(dev)]  # (n, heads, Q, K)
            own = probs[rows]
            if self.is_cross:
                w = plan.cross_schedule[rows.cpu(), st.step].to(dev, probs.dtype)[:, None, None, :]  # (n,1,1,L)
                if bool((w > 0).any()):
                    m = plan.mapper[rows.cpu()].to(dev, probs.dtype)  # (n, L, L)
                    a = plan.alpha[rows.cpu()].to(dev, probs.dtype)[:, None, None, :]
                    eq = plan.equalizer[rows.cpu()].to(dev, probs.dtype)[:, None, None, :]
                    edited = torch.einsum("nhqs,nst->nhqt", src, m) * a + own * (1 - a)
                    probs = probs.clone()
                    probs[rows] = w * (edited * eq) + (1 - w) * own
                    st.acted.add(self.name)
            else:
                probs = probs.clone()
                probs[rows] = src
                st.acted.add(self.name)
        return _finish(attn, probs @ vh, residual, shape4)

    def _collect(self, probs: torch.Tensor) -> None:
        st = self.state
        maps = probs.mean(1).float()  # (B, Q, L), averaged over heads
        st.blend_sum = maps if st.blend_sum is None else st.blend_sum + maps
        st.blend_count += 1


def rows_none(device) -> torch.Tensor:
    return torch.zeros(0, dtype=torch.long, device=device)


def attention_layer_names(unet) -> list[str]:
    """Names (without the '.processor' suffix) of every attention layer, e.g. '...attn1'."""
    return [k[: -len(PROC_SUFFIX)] for k in unet.attn_processors]


def self_attention_names(unet, parents: tuple[str, ...]) -> list[str]:
    """The attn1 layers inside each of `parents` (e.g. 'up_blocks.2.attentions.0', or an attn1 path itself);
    a path matching none is an error."""
    names = attention_layer_names(unet)
    out = []
    for parent in parents:
        found = [n for n in names if (n == parent or n.startswith(parent + ".")) and n.endswith(".attn1")]
        if not found:
            raise ValueError(f"no self-attention layer under {parent!r} in this UNet")
        out.extend(found)
    return out


def _feature_hook(name: str, state: ControlState):
    def hook(module, args, output):
        plan = state.plan
        rows = state.rows(plan.feature_steps.to(output.device), plan.target.to(output.device))
        if not rows.numel():
            return None
        output = output.clone()
        output[rows] = state.source_for(f"{name}.conv2", output, rows)
        state.acted.add(name)
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
    of each resnet in `pnp_feature_layers` a forward hook. All other layers: fused SDPA.
    """
    original = dict(unet.attn_processors)
    names = attention_layer_names(unet)
    pnp_names = set(self_attention_names(unet, pnp_attn_parents)) if pnp_attn_parents else set()
    procs: dict[str, object] = {}
    controlled: list[str] = []
    for name in names:
        if p2p:
            procs[name + PROC_SUFFIX] = P2PAttnProcessor(name, state, is_cross=name.endswith("attn2"))
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
