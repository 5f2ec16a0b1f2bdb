"""Frozen, validated configs for the editing methods (no torch import: manifests validate with them).

Every field says its unit, range and why its default is what it is. Configs are built from
manifest settings with :func:`config_from_settings`, which names the bad key and value.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# Plug-and-Play's decoder layers on the SD 1.x/2.x UNet (methods.md section 4).
SD_PNP_FEATURE_LAYERS: tuple[str, ...] = ("up_blocks.1.resnets.1",)  # decoder layer 4
SD_PNP_ATTN_LAYERS: tuple[str, ...] = (  # decoder layers 4-11 (self-attention q/k)
    "up_blocks.1.attentions.1",
    "up_blocks.1.attentions.2",
    "up_blocks.2.attentions.0",
    "up_blocks.2.attentions.1",
    "up_blocks.2.attentions.2",
    "up_blocks.3.attentions.0",
    "up_blocks.3.attentions.1",
    "up_blocks.3.attentions.2",
)

P2P_KINDS = ("auto", "replace", "refine", "reweight")
# Targets per UNet batch (a chunk: rows = 2 x targets + one source row per image); runs override it.
DEFAULT_MAX_BATCH = 8
# torch.compile of the controlled UNet (editing.model.compile_unet): off, or a torch.compile mode;
# "reduce-overhead" (CUDA graphs) needs CUDA and falls back to "default" elsewhere
COMPILE_MODES = ("off", "default", "max-autotune", "reduce-overhead")
PNP_SOURCE_TEXTS = ("source", "empty")
BLEND_NORMALIZATIONS = ("minmax", "max")


def _check_fraction(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a fraction of the steps in [0, 1], got {value!r}")


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")


def _check_guidance(value: float) -> None:
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not math.isfinite(value)
        or not 1.0 <= value <= 30.0
    ):
        raise ValueError(f"guidance_scale must be a number in [1, 30], got {value!r}")


def _check_layers(name: str, layers: tuple[str, ...]) -> None:
    if not isinstance(layers, tuple) or not all(isinstance(x, str) and x for x in layers):
        raise ValueError(
            f"{name} must be a tuple of module paths like 'up_blocks.1.resnets.1', got {layers!r}"
        )


@dataclass(frozen=True)
class PnPConfig:
    """Plug-and-Play (Tumanyan et al., CVPR 2023): inject the source's decoder features."""

    guidance_scale: float = (
        7.5  # CFG scale for the target rows, [1, 30]; 7.5 is the paper's default
    )
    feature_t: float = (
        0.8  # fraction of steps (from the noisy end) with residual-feature injection; paper: 0.8
    )
    attn_t: float = 0.5  # fraction of steps with self-attention q/k injection; paper: 0.5
    # Module paths (inside the UNet) whose second conv's output is injected. None = the model's default
    # (SD: decoder layer 4 = up_blocks.1.resnets.1; other models record theirs in editflow.json).
    feature_layers: tuple[str, ...] | None = None
    # Transformer blocks' parents (e.g. "up_blocks.2.attentions.0") whose attn1 q/k are injected.
    # None = the model's default (SD: decoder layers 4-11).
    attn_layers: tuple[str, ...] | None = None
    negative_prompt: str = ""  # text for the unconditional branch of the target rows
    # Add the source's Direct Inversion correction to the target rows too (True): a target equal to the
    # source then reproduces the source exactly. False (default) = the published procedure (corrections
    # on the source branch only). Chosen by the reference-model evaluation (shapes-v2, README): with
    # True, edited targets drift in colour and background (the source's corrections do not fit a
    # different prompt): colour-swap success 75% vs 100%, background PSNR 37 vs 46 dB, same IoU.
    target_correction: bool = False
    # Also inject into the unconditional target rows, as the reference code does (True). Default False:
    # injecting only the conditional row keeps more of the structure on the reference model (IoU 0.66
    # vs 0.46 for colour swaps) and lets the guidance act on the target's own unconditional row.
    inject_uncond: bool = False
    # Text of the source branch whose features and q/k are injected: "source" (the source prompt, the
    # inversion's own text) or "empty" (the empty prompt ""). "empty" is the published behaviour: both
    # MichalGeyer/pnp-diffusers and cure-lab/PnPInversion compute the injected source features with ""
    # (the inversion itself always uses the source prompt). With "empty", an unchanged target prompt no
    # longer reproduces the source exactly (its rows see the source prompt, the injected features "").
    source_text: str = "source"

    def __post_init__(self) -> None:
        _check_guidance(self.guidance_scale)
        _check_bool("target_correction", self.target_correction)
        _check_bool("inject_uncond", self.inject_uncond)
        if self.source_text not in PNP_SOURCE_TEXTS:
            raise ValueError(
                f"source_text must be one of {PNP_SOURCE_TEXTS}, got {self.source_text!r}"
            )
        _check_fraction("feature_t", self.feature_t)
        _check_fraction("attn_t", self.attn_t)
        if self.feature_layers is not None:
            _check_layers("feature_layers", self.feature_layers)
        if self.attn_layers is not None:
            _check_layers("attn_layers", self.attn_layers)
        if not isinstance(self.negative_prompt, str):
            raise ValueError(f"negative_prompt must be a string, got {self.negative_prompt!r}")


@dataclass(frozen=True)
class P2PConfig:
    """Prompt-to-Prompt (Hertz et al. 2022): control the target's cross-attention maps."""

    guidance_scale: float = 7.5  # CFG scale for the target rows, [1, 30]; the paper's 7.5
    # "replace" (word swap: same word count), "refine" (added/removed words, aligned globally),
    # "reweight" (target == source, only `equalizer` changes), or "auto": replace when both prompts have
    # the same number of words, refine otherwise (reweight when they are equal). Words are counted as the
    # tokenizer splits them: a punctuation mark is a word ("a cat, on" has four).
    kind: str = "auto"
    # Fraction of steps (from the noisy end) during which the target takes the source's cross-attention
    # maps; a float, or {word: fraction} with an optional "default_" entry. Authors: 0.8 (swap); 0.4 in PIE-Bench.
    cross_replace_steps: float | Mapping[str, float] = 0.8
    self_replace_steps: float = (
        0.4  # fraction of steps with the source's self-attention maps; authors: 0.4
    )
    # {target word: weight}: that word's map column is multiplied by the weight (no renormalising);
    # typical range -2..5. Applied while the cross maps are replaced.
    equalizer: Mapping[str, float] = field(default_factory=dict)
    # Local blend: words of the source and of the target whose attention decides where the edit may act;
    # empty = no local blend (the whole image may change).
    blend_source_words: tuple[str, ...] = ()
    blend_target_words: tuple[str, ...] = ()
    blend_threshold: float = 0.3  # mask = normalised summed map > threshold; reference 0.3
    blend_start: float = 0.2  # fraction of steps before local blend starts; reference 0.2
    # How the summed map is scaled before the threshold: "minmax" ([min, max] -> [0, 1]) or "max" (divide
    # by the max: the reference). The same on maps that are ~0 away from the word (SD's); on maps with a
    # constant floor (a small model's, e.g. shapes-v1's: every cell above 0.7 of the max) "max" keeps every
    # cell, so local blend would do nothing.
    blend_normalize: str = "minmax"
    # Self-attention maps are replaced only in layers with at most this fraction of the latent's positions
    # (SD: 32x32 of a 64x64 latent = 1/4: the reference skips the highest resolution).
    self_max_fraction: float = 0.25
    # Local-blend maps come from cross-attention layers of exactly this fraction of the latent's positions
    # (SD: 16x16 of 64x64 = 1/16). None = the model's default from editflow.json, else 1/16.
    blend_fraction: float | None = None
    negative_prompt: str = ""  # text for the unconditional branch of the target rows
    target_correction: bool = (
        False  # as PnPConfig.target_correction (False = the published procedure)
    )

    def __post_init__(self) -> None:
        _check_guidance(self.guidance_scale)
        _check_bool("target_correction", self.target_correction)
        if self.kind not in P2P_KINDS:
            raise ValueError(f"kind must be one of {P2P_KINDS}, got {self.kind!r}")
        if isinstance(self.cross_replace_steps, Mapping):
            for word, frac in self.cross_replace_steps.items():
                if not isinstance(word, str):
                    raise ValueError(f"cross_replace_steps keys must be words, got {word!r}")
                _check_fraction(f"cross_replace_steps[{word!r}]", frac)
            object.__setattr__(self, "cross_replace_steps", dict(self.cross_replace_steps))
        else:
            _check_fraction("cross_replace_steps", self.cross_replace_steps)
        _check_fraction("self_replace_steps", self.self_replace_steps)
        if not isinstance(self.equalizer, Mapping):
            raise ValueError(
                f"equalizer must be a mapping of word -> weight, got {self.equalizer!r}"
            )
        for word, weight in self.equalizer.items():
            if (
                not isinstance(word, str)
                or not isinstance(weight, (int, float))
                or not math.isfinite(weight)
            ):
                raise ValueError(
                    f"equalizer entries must be word -> finite number, got {word!r}: {weight!r}"
                )
        object.__setattr__(self, "equalizer", dict(self.equalizer))
        for name in ("blend_source_words", "blend_target_words"):
            words = getattr(self, name)
            if isinstance(words, list):
                words = tuple(words)
                object.__setattr__(self, name, words)
            if not isinstance(words, tuple) or not all(isinstance(w, str) and w for w in words):
                raise ValueError(f"{name} must be a tuple of words, got {words!r}")
        if bool(self.blend_source_words) != bool(self.blend_target_words):
            raise ValueError(
                "local blend needs both blend_source_words and blend_target_words (or neither)"
            )
        _check_fraction("blend_threshold", self.blend_threshold)
        _check_fraction("blend_start", self.blend_start)
        if self.blend_normalize not in BLEND_NORMALIZATIONS:
            raise ValueError(
                f"blend_normalize must be one of {BLEND_NORMALIZATIONS}, got {self.blend_normalize!r}"
            )
        if not 0.0 < self.self_max_fraction <= 1.0:
            raise ValueError(f"self_max_fraction must be in (0, 1], got {self.self_max_fraction!r}")
        if self.blend_fraction is not None and not 0.0 < self.blend_fraction <= 1.0:
            raise ValueError(f"blend_fraction must be in (0, 1], got {self.blend_fraction!r}")
        if not isinstance(self.negative_prompt, str):
            raise ValueError(f"negative_prompt must be a string, got {self.negative_prompt!r}")


METHOD_CONFIGS: dict[str, type] = {"pnp": PnPConfig, "p2p": P2PConfig}


def config_from_settings(
    method: str, settings: Mapping[str, Any] | None = None
) -> PnPConfig | P2PConfig:
    """Build the config of `method` from a plain mapping (e.g. a manifest's JSON `settings`).

    Raises ``ValueError`` naming the unknown method, unknown key or bad value.
    """
    if method not in METHOD_CONFIGS:
        raise ValueError(f"unknown method {method!r}; known: {sorted(METHOD_CONFIGS)}")
    cls = METHOD_CONFIGS[method]
    settings = dict(settings or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(f"unknown {method} setting(s) {unknown}; known: {sorted(known)}")
    for key in ("feature_layers", "attn_layers", "blend_source_words", "blend_target_words"):
        if isinstance(settings.get(key), list):
            settings[key] = tuple(settings[key])
    try:
        return cls(**settings)
    except TypeError as exc:  # a wrong type that the dataclass could not even take
        raise ValueError(f"bad {method} settings {settings!r}: {exc}") from exc


def config_to_settings(config: PnPConfig | P2PConfig) -> dict[str, Any]:
    """A JSON-ready dict of a config (inverse of :func:`config_from_settings`)."""
    out = dataclasses.asdict(config)
    for key, value in out.items():
        if isinstance(value, tuple):
            out[key] = list(value)
    return out
