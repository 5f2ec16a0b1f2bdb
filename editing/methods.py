"""The editing methods' registry and :func:`edit`, the engine's one packer: every target of every method
packed into chunks once, each chunk edited by its method, a failing chunk retried per source and per target.

Each method (:mod:`editing.pnp`, :mod:`editing.p2p`) gives a chunk key (which targets may share a UNet batch)
and ``edit_chunk(model, pieces, **options) -> list[EditResult]``, one chunk's loop. :data:`METHODS` maps each
method name (those of :data:`editing.configs.METHOD_CONFIGS`) to its :class:`EditMethod`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from editing import p2p, pnp
from editing.batching import EditResult, Piece, SourceGroup, Target, pack_chunks
from editing.configs import DEFAULT_MAX_BATCH, METHOD_CONFIGS
from editing.model import EditModel
from editing.p2p import local_blend_mask
from editing.pnp import PnPFeatures, pnp_feature_facts

__all__ = [
    "METHODS",
    "METHOD_OF_CONFIG",
    "ChunkDone",
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

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EditMethod:
    """One registered editing method: how its targets share chunks and how it edits one chunk."""

    name: str  # a key of editing.configs.METHOD_CONFIGS
    # targets with equal keys may share a chunk
    chunk_key: Callable[[EditModel, SourceGroup, Target], Any]
    # (model, pieces, **options) -> one result per target, in chunk order
    edit_chunk: Callable[..., list[EditResult]]
    options: frozenset[str] = frozenset()  # the keyword options `edit_chunk` takes

    @property
    def config_type(self) -> type:
        return METHOD_CONFIGS[self.name]

    def run(
        self,
        model: EditModel,
        groups: Sequence[SourceGroup],
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        **options: Any,
    ) -> list[list[EditResult]]:
        """:func:`edit` of groups whose targets all use this method; raises on the first failure."""
        unknown = set(options) - self.options
        if unknown:
            raise TypeError(f"{self.name} takes no option(s) {sorted(unknown)}")
        for gi, g in enumerate(groups):
            for t in g.targets:
                if not isinstance(t.config, self.config_type):
                    raise ValueError(
                        f"group {gi}: target {t.prompt!r} has a {type(t.config).__name__}, "
                        f"{self.name} needs {self.config_type.__name__}"
                    )
        return edit(model, groups, max_batch=max_batch, isolate_failures=False, **options)  # type: ignore[return-value]


METHODS: dict[str, EditMethod] = {
    m.name: m
    for m in (
        EditMethod(
            "pnp", pnp.chunk_key, pnp.edit_chunk, options=frozenset({"record_features", "pad"})
        ),
        EditMethod("p2p", p2p.chunk_key, p2p.edit_chunk, options=frozenset({"pad"})),
    )
}
METHOD_OF_CONFIG: dict[type, str] = {m.config_type: m.name for m in METHODS.values()}


def edit_pnp(
    model: EditModel,
    groups: Sequence[SourceGroup],
    *,
    max_batch: int = DEFAULT_MAX_BATCH,
    record_features: bool = False,
) -> list[list[EditResult]]:
    """Plug-and-Play diffusion features (Tumanyan et al., CVPR 2023) on Direct-Inversion latents.

    `record_features`: live chunks return their source features with each result (to cache them).
    """
    return METHODS["pnp"].run(model, groups, max_batch=max_batch, record_features=record_features)


def edit_p2p(
    model: EditModel, groups: Sequence[SourceGroup], *, max_batch: int = DEFAULT_MAX_BATCH
) -> list[list[EditResult]]:
    """Prompt-to-Prompt cross-attention control (Hertz et al. 2022) on Direct-Inversion latents.

    Every chunk runs its source rows (their maps are needed); a group's cached PnP features are unused.
    """
    return METHODS["p2p"].run(model, groups, max_batch=max_batch)


@dataclass(frozen=True)
class ChunkDone:
    """What :func:`edit` reports through `on_chunk` after each chunk (its retries included)."""

    method: str
    targets: int  # the chunk's targets, all finished now
    failed: int  # of them, how many ended in an exception
    seconds: float  # wall time of the chunk and its retries
    unet_evals: float = 0.0  # UNet row evaluations of its edited targets (padding included)
    padding_evals: float = 0.0  # of them, padding rows' (waste: the price of a fixed batch shape)
    # (group index, target index, its result or exception) per target of the chunk, in chunk order
    outcomes: tuple[tuple[int, int, Outcome], ...] = ()


Outcome = EditResult | Exception


def edit(
    model: EditModel,
    groups: Sequence[SourceGroup],
    *,
    max_batch: int = DEFAULT_MAX_BATCH,
    record_features: bool = False,
    pad: bool | None = None,
    on_chunk: Callable[[ChunkDone], None] | None = None,
    isolate_failures: bool = True,
) -> list[list[Outcome]]:
    """Edit every group's targets, each with the method its config names; one list per group, in target
    order, holding each target's :class:`EditResult` or (`isolate_failures`) the exception that failed it.

    The targets of all methods are packed into chunks of at most `max_batch` targets once; `on_chunk` hears
    of each finished chunk. A failing chunk is retried per source, then per target, so that one bad edit
    fails alone (with ``isolate_failures=False`` the first failure is raised instead). Options go to the
    methods that take them (`record_features`: Plug-and-Play's, kept in the retries). `pad`: every chunk
    runs at a fixed batch shape (rows padded to a power of two; the padding counted as waste); None:
    padded when the model's UNet is compiled (:func:`editing.model.compile_unet`), so that its graphs are
    reused, and not otherwise.
    """
    # 1. Validate: every target's config names a method
    methods = [[_method_of(gi, t) for t in g.targets] for gi, g in enumerate(groups)]
    if pad is None:
        pad = model.compiled != "off"
    options = {"record_features": record_features, "pad": pad}

    def key(gi: int, group: SourceGroup, ti: int) -> Any:
        method = methods[gi][ti]
        return method.name, method.chunk_key(model, group, group.targets[ti])

    # 2. Pack the targets of every method into chunks, once
    chunks = pack_chunks(groups, max_batch, key)
    out: list[list[Outcome | None]] = [[None] * len(g.targets) for g in groups]
    # 3. Edit chunk by chunk (each chunk one method), retrying a failing one in smaller parts
    for chunk in chunks:
        start = time.perf_counter()
        method = methods[chunk[0].group_index][chunk[0].target_indices[0]]
        taken = {k: v for k, v in options.items() if k in method.options}
        results = _edit_isolating(model, method, chunk, taken, isolate_failures)
        for (gi, ti), result in zip(_slots(chunk), results):
            out[gi][ti] = result
        if on_chunk is not None:
            ok = [r for r in results if not isinstance(r, Exception)]
            on_chunk(
                ChunkDone(
                    method.name,
                    len(results),
                    len(results) - len(ok),
                    time.perf_counter() - start,
                    unet_evals=sum(sum(r.unet_evals.values()) for r in ok),
                    padding_evals=sum(r.unet_evals.get("padding", 0.0) for r in ok),
                    outcomes=tuple((gi, ti, r) for (gi, ti), r in zip(_slots(chunk), results)),
                )
            )
    return out  # type: ignore[return-value]


def _method_of(gi: int, target: Target) -> EditMethod:
    for method in METHODS.values():
        if type(target.config) is method.config_type:
            return method
    raise ValueError(
        f"group {gi}: target {target.prompt!r} has an unknown config type "
        f"{type(target.config).__name__}"
    )


def _slots(pieces: Sequence[Piece]) -> list[tuple[int, int]]:
    """(group index, target index) of each target of a chunk, in chunk order."""
    return [(p.group_index, ti) for p in pieces for ti in p.target_indices]


def _edit_isolating(
    model: EditModel,
    method: EditMethod,
    pieces: list[Piece],
    options: dict[str, Any],
    isolate: bool,
) -> list[Outcome]:
    """One chunk's outcomes in chunk order: edited together; on failure per piece (source), then per
    target, so that a bad edit fails alone (its exception in its place)."""
    try:
        return list(method.edit_chunk(model, pieces, **options))
    except Exception as exc:  # noqa: BLE001 - isolated below, or raised
        if not isolate:
            raise
        if len(pieces) == 1 and len(pieces[0].target_indices) == 1:
            return [exc]
        logger.warning(
            "%s chunk of %d targets failed (%s: %s); retrying per source and target",
            method.name, len(_slots(pieces)), type(exc).__name__, exc,
        )  # fmt: skip
    if len(pieces) > 1:
        return [r for p in pieces for r in _edit_isolating(model, method, [p], options, True)]
    piece = pieces[0]
    return [
        r
        for ti in piece.target_indices
        for r in _edit_isolating(
            model, method, [Piece(piece.group_index, piece.group, (ti,))], options, True
        )
    ]
