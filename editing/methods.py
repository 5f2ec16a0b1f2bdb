"""The editing methods' registry and :func:`edit`, which runs a mixed list of targets through it.

Every method is ``run(model, groups, *, max_batch=8, **options) -> list[list[EditResult]]``: each
:class:`SourceGroup` is one inverted source image with K targets, and the result has one list per group
in target order. :data:`METHODS` maps each method name (those of :data:`editing.configs.METHOD_CONFIGS`)
to its :class:`EditMethod`: the function, its config type and the options it takes. The methods
themselves live in :mod:`editing.pnp` and :mod:`editing.p2p`, their shared parts in
:mod:`editing.batching`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from editing.batching import EditResult, Piece, SourceGroup, Target
from editing.configs import DEFAULT_MAX_BATCH, METHOD_CONFIGS
from editing.model import EditModel
from editing.p2p import edit_p2p, local_blend_mask
from editing.pnp import PnPFeatures, edit_pnp, pnp_feature_facts

__all__ = [
    "METHODS",
    "METHOD_OF_CONFIG",
    "EditMethod",
    "EditResult",
    "PnPFeatures",
    "SourceGroup",
    "Target",
    "edit",
    "edit_p2p",
    "edit_pnp",
    "local_blend_mask",
    "pnp_feature_facts",
]


@dataclass(frozen=True)
class EditMethod:
    """One registered editing method."""

    name: str  # a key of editing.configs.METHOD_CONFIGS
    run: Callable[..., list[list[EditResult]]]
    options: frozenset[str] = frozenset()  # the keyword options `run` takes beyond max_batch

    @property
    def config_type(self) -> type:
        return METHOD_CONFIGS[self.name]


METHODS: dict[str, EditMethod] = {
    m.name: m
    for m in (
        EditMethod("pnp", edit_pnp, options=frozenset({"record_features"})),
        EditMethod("p2p", edit_p2p),
    )
}
METHOD_OF_CONFIG: dict[type, str] = {m.config_type: m.name for m in METHODS.values()}


def edit(
    model: EditModel,
    groups: Sequence[SourceGroup],
    *,
    max_batch: int = DEFAULT_MAX_BATCH,
    record_features: bool = False,
) -> list[list[EditResult]]:
    """Edit every group's targets, each with the method its config names; one result list per group.

    Options go to the methods that take them (`record_features`: Plug-and-Play's); the others ignore them.
    """
    options = {"record_features": record_features}
    out: list[list[EditResult | None]] = [[None] * len(g.targets) for g in groups]
    for method in METHODS.values():
        parts = _parts_of(groups, method.config_type)
        if not parts:
            continue
        sub = [dataclasses.replace(p.group, targets=p.targets) for p in parts]
        taken = {k: v for k, v in options.items() if k in method.options}
        for part, results in zip(parts, method.run(model, sub, max_batch=max_batch, **taken)):
            for ti, result in zip(part.target_indices, results):
                out[part.group_index][ti] = result
    for gi, g in enumerate(groups):
        for ti, t in enumerate(g.targets):
            if out[gi][ti] is None:
                raise ValueError(
                    f"group {gi}: target {t.prompt!r} has an unknown config type "
                    f"{type(t.config).__name__}"
                )
    return out  # type: ignore[return-value]


def _parts_of(groups: Sequence[SourceGroup], config_type: type) -> list[Piece]:
    """Per group with any, the targets whose config is exactly `config_type`."""
    parts = []
    for gi, g in enumerate(groups):
        idxs = tuple(ti for ti, t in enumerate(g.targets) if type(t.config) is config_type)
        if idxs:
            parts.append(Piece(gi, g, idxs))
    return parts
