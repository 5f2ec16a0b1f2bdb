"""The manifest format: one row per edit; known columns, their types and defaults, and `EditRow`.

Required: ``image_uri``, ``source_prompt``, ``target_prompt``. Optional: ``edit_id``,
``method`` ("pnp" or "p2p"), ``seed``, ``num_steps``, ``guidance_scale``, ``negative_prompt``
and ``settings`` (a JSON object of method settings, see ``editing.configs``). Every other
column is passthrough: carried untouched into metadata and results. One passthrough column is also
read: ``qa_contrast``, the edit-QA judge's contrast prompts (:func:`contrast_prompts`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from editing.configs import (
    METHOD_CONFIGS,
    P2PConfig,
    PnPConfig,
    config_from_settings,
    config_to_settings,
)

__all__ = [
    "REQUIRED_COLUMNS",
    "OPTIONAL_COLUMNS",
    "KNOWN_COLUMNS",
    "RESERVED_COLUMNS",
    "METHODS",
    "DEFAULT_METHOD",
    "DEFAULT_SEED",
    "DEFAULT_NUM_STEPS",
    "NUM_STEPS_RANGE",
    "GUIDANCE_RANGE",
    "NORMALIZED_SCHEMA",
    "default_guidance",
    "EditRow",
    "QA_CONTRAST_COLUMN",
    "QA_CONTRAST_MAX",
    "contrast_prompts",
]

REQUIRED_COLUMNS: tuple[str, ...] = ("image_uri", "source_prompt", "target_prompt")
OPTIONAL_COLUMNS: tuple[str, ...] = (
    "edit_id",
    "method",
    "seed",
    "num_steps",
    "guidance_scale",
    "negative_prompt",
    "settings",
)
KNOWN_COLUMNS: tuple[str, ...] = REQUIRED_COLUMNS + OPTIONAL_COLUMNS
# Names the results table uses for its own columns: a passthrough column may not take them.
RESERVED_COLUMNS: tuple[str, ...] = (
    "row",
    "status",
    "output_uri",
    "metadata_uri",
    "error",
    "cache_hit",
    "unet_evals",
    "seconds",
    "qa_text",  # edit QA (tasks.results)
    "qa",
    "qa_clip",
)

METHODS: tuple[str, ...] = tuple(METHOD_CONFIGS)  # ("pnp", "p2p")
DEFAULT_METHOD = "pnp"  # Plug-and-Play: the method that needs no word alignment between prompts
DEFAULT_SEED = 0  # seeds only matter for stochastic parts; a fixed default keeps reruns identical
DEFAULT_NUM_STEPS = 50  # DDIM steps of inversion and editing; both papers use 50
NUM_STEPS_RANGE = (1, 1000)  # inclusive; 1000 = the training schedule's length
GUIDANCE_RANGE = (1.0, 30.0)  # inclusive; the configs' own bounds

# What `normalize` returns before the passthrough columns: every value filled.
# `settings` is the canonical JSON of the row's method settings without guidance_scale and
# negative_prompt (those are resolved into their own columns).
NORMALIZED_SCHEMA = pa.schema(
    [
        pa.field("row", pa.int64(), nullable=False),
        pa.field("edit_id", pa.string(), nullable=False),
        pa.field("image_uri", pa.string(), nullable=False),
        pa.field("source_prompt", pa.string(), nullable=False),
        pa.field("target_prompt", pa.string(), nullable=False),
        pa.field("method", pa.string(), nullable=False),
        pa.field("seed", pa.int64(), nullable=False),
        pa.field("num_steps", pa.int64(), nullable=False),
        pa.field("guidance_scale", pa.float64(), nullable=False),
        pa.field("negative_prompt", pa.string(), nullable=False),
        pa.field("settings", pa.string(), nullable=False),
    ]
)


# The edit-QA judge's contrast prompts of a row (editing.judge): prompts the edited image should NOT show
# (e.g. the edited attribute's other values: "a red circle|a green circle"), as a "|"-separated string or
# a list of strings; null or empty = judged against the source prompt only. Passthrough (kept in the
# results), checked by manifests.validate, read by the shard's judge.
QA_CONTRAST_COLUMN = "qa_contrast"
# at most this many per row: each one costs the judge len(timesteps) x len(seeds) UNet evaluations
QA_CONTRAST_MAX = 16


def contrast_prompts(value: Any) -> tuple[str, ...]:
    """A ``qa_contrast`` value as its prompts: a "|"-separated string or a list of strings (each stripped;
    None = none). ``ValueError`` naming the problem for anything else, an empty prompt or too many."""
    if value is None:
        return ()
    if isinstance(value, str):
        items: list[Any] = value.split("|") if value.strip() else []
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise ValueError(
            f"must be '|'-separated prompts or a list of prompts, got {type(value).__name__}"
        )
    prompts = []
    for i, item in enumerate(items, 1):
        if not isinstance(item, str):
            raise ValueError(f"prompt {i} is not a string: {item!r}")
        if not item.strip():
            raise ValueError(f"prompt {i} of {len(items)} is empty")
        prompts.append(item.strip())
    if len(prompts) > QA_CONTRAST_MAX:
        raise ValueError(f"has {len(prompts)} prompts; at most {QA_CONTRAST_MAX}")
    return tuple(prompts)


def default_guidance(method: str) -> float:
    """The method config's default ``guidance_scale`` (7.5 for both PnP and P2P)."""
    for f in dataclasses.fields(METHOD_CONFIGS[method]):
        if f.name == "guidance_scale":
            return float(f.default)
    raise ValueError(f"method {method!r} has no guidance_scale")  # pragma: no cover


@dataclass(frozen=True, slots=True)
class EditRow:
    """One validated manifest row with defaults filled: what the planner and shard tasks consume."""

    row: int  # 0-based position in the (concatenated) manifest
    edit_id: str  # user-given (key-safe) or derived (manifests.identity.derive_edit_id)
    image_uri: (
        str  # as in the manifest: s3://..., file:///... or a path (relative = to the working dir)
    )
    source_prompt: str
    target_prompt: str
    method: str  # one of METHODS
    seed: int  # int64
    num_steps: int  # in NUM_STEPS_RANGE
    guidance_scale: float  # in GUIDANCE_RANGE
    negative_prompt: str
    # The method config of this edit (settings, guidance_scale and negative_prompt included),
    # built once per distinct value by manifests.edit_rows and shared by its rows.
    config: PnPConfig | P2PConfig
    passthrough: dict[str, Any] = field(default_factory=dict)  # the manifest's other columns

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (JSON-ready when the passthrough values are); the config as its settings."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["config"] = config_to_settings(self.config)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EditRow:
        """Inverse of :meth:`to_dict`; unknown keys or bad settings raise ``ValueError``."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown EditRow field(s) {unknown}")
        values = dict(data)
        if isinstance(values.get("config"), Mapping):
            values["config"] = config_from_settings(values.get("method", ""), values["config"])
        return cls(**values)
