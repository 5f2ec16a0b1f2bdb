"""Edit QA: the editing model itself judges whether an edited image shows its target prompt, and a gate.

The judge is the zero-shot diffusion classifier of Li et al. 2023: an image matches the prompt under
which the UNet predicts the noise added to it best. Each edited image is VAE-encoded, the same noise
(fixed seeds) is added at fixed timesteps, and the UNet's noise-prediction error is compared under the
target prompt and under the other prompts (the source prompt, plus any contrast prompts: e.g. every other
value of the edited attribute, from a manifest column; or, with ``JudgeConfig.derived_contrasts``, derived
from a word-swap prompt pair by editing.contrasts). The ``text`` margin is positive when the target
prompt explains the image better than every other prompt (see :func:`text_margin`); an edit judged with
contrast prompts also reports it as ``contrast``, so that a gate can hold those margins (against more
alternatives, so lower) to their own threshold (editing.gate).

The API the pipeline wires in (stable):

    scores = judge_edits(model, images, source_prompts, target_prompts, JudgeConfig(), contrasts)
    scores = judge_latents(model, latents, ...)       # the same on an edit's final latents
    scores[0].text, scores[0].as_dict(), scores[0].unet_evals
    gate = parse_gate(DEFAULT_GATE)                     # or "text>=0.1,contrast>=0.02", "off"
    reasons = gate.check(scores[0])                     # [] = passes; else why it needs review
    JudgeConfig.from_settings(config.to_settings())     # the sidecar's form

torch + diffusers + PIL only (no Prefect, no storage): usable from a notebook.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from editing.contrasts import derive_contrasts
from editing.ddim import split_output
from editing.gate import DEFAULT_GATE, GATE_METRICS, Gate, GateRule, parse_gate
from editing.model import EditModel

__all__ = [
    "DEFAULT_GATE",
    "GATE_METRICS",
    "Gate",
    "GateRule",
    "JudgeConfig",
    "JudgeScore",
    "judge_edits",
    "judge_latents",
    "parse_gate",
    "text_margin",
]


@dataclass(frozen=True)
class JudgeConfig:
    """How the judge samples the noise-prediction error; UNet evaluations per edit =
    prompts x len(timesteps) x len(seeds) (2 prompts, target and source, without contrast prompts)."""

    # training timesteps (0 .. num_train_timesteps - 1) at which the image is noised and the UNet asked.
    # Chosen on 48 calibration sources (`python -m refmodel.evaluate --gate 48 48`, README: Edit QA) from
    # runs of the grid 50, 150, ..., 950 with 1-2 seeds (at most 8 samples): high noise carries the edit
    # (single-timestep AUC at t=750: background 1.00, colour 0.86; t<=450 0.63-0.79); 750 + 850 with 2
    # seeds gave the best calibration recall of the targets (colour, background, overall) averaged
    # over judging without and with contrast prompts (one config serves both).
    timesteps: tuple[int, ...] = (750, 850)
    # seeds of the CPU torch.Generator that draws the noise (one draw per seed, shared by every edit and
    # prompt: paired noise is what makes the prompts' errors comparable). Two (see timesteps):
    # 2 prompts x 2 x 2 = 8 UNet evaluations per edit (with contrast prompts: prompts x 4).
    seeds: tuple[int, ...] = (0, 1)
    # UNet rows per call (rows = edits x prompts x timesteps x seeds, chunked). On the bundled model
    # (16x16 latent, 1 CPU thread) 64 rows ran at 91 ms per 16-evaluation edit, 16 rows at 115, 128 at 93;
    # a large model on a small GPU may need fewer (not measured here).
    max_batch: int = 64
    # contrast prompts derived from the prompt pair (editing.contrasts) for an edit without its own
    # (a manifest's qa_contrast): a word swap is also judged against the target prompt with the target
    # word replaced by its this-many nearest whole-word tokens in the text encoder's embedding table;
    # other pairs (restyles, additions) against the source prompt alone. Each costs
    # len(timesteps) x len(seeds) UNet evaluations. 0 (off) by default: on 16 calibration sources of the
    # bundled model (`python -m refmodel.evaluate --gate-derived 16 16`) the best setting, 1 derived
    # contrast (12 evaluations per swap, gate rule `derived>=-0.04132`), lifted colour AUC 0.90 -> 0.99
    # but lost shape failures, and its mean recall of the targets (0.846) did not beat the source
    # prompt alone (0.855): this toy model's embedding table does not group words by kind (README: Edit QA).
    derived_contrasts: int = 0

    def __post_init__(self) -> None:
        for name in ("timesteps", "seeds"):
            value = getattr(self, name)
            if (
                not isinstance(value, tuple)
                or not value
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
                or any(v < 0 for v in value)
            ):
                raise ValueError(
                    f"JudgeConfig.{name} must be a non-empty tuple of non-negative ints, got {value!r}"
                )
            if len(set(value)) != len(value):
                raise ValueError(f"JudgeConfig.{name} has repeated values: {value!r}")
        if (
            not isinstance(self.max_batch, int)
            or isinstance(self.max_batch, bool)
            or self.max_batch < 1
        ):
            raise ValueError(f"JudgeConfig.max_batch must be an int >= 1, got {self.max_batch!r}")
        if (
            not isinstance(self.derived_contrasts, int)
            or isinstance(self.derived_contrasts, bool)
            or self.derived_contrasts < 0
        ):
            raise ValueError(
                f"JudgeConfig.derived_contrasts must be an int >= 0, got {self.derived_contrasts!r}"
            )

    def to_settings(self) -> dict[str, Any]:
        """The config as plain JSON values (for a sidecar or a results table's settings)."""
        return {
            "timesteps": list(self.timesteps),
            "seeds": list(self.seeds),
            "max_batch": self.max_batch,
            # only when on: the settings of a judge without derivation read as they always have
            **({"derived_contrasts": self.derived_contrasts} if self.derived_contrasts else {}),
        }

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> JudgeConfig:
        """The config from :meth:`to_settings`' form; unknown keys are refused by name."""
        known = {"timesteps", "seeds", "max_batch", "derived_contrasts"}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise ValueError(f"unknown judge setting(s) {unknown}; known: {sorted(known)}")
        kw = dict(settings)
        for name in ("timesteps", "seeds"):
            if isinstance(kw.get(name), list):
                kw[name] = tuple(kw[name])
        return cls(**kw)

    def unet_evals(self, n_prompts: int = 2) -> int:
        """UNet evaluations for one edit judged against `n_prompts` prompts (target included)."""
        return n_prompts * len(self.timesteps) * len(self.seeds)


@dataclass(frozen=True)
class JudgeScore:
    """One edit's judgement. `errors[p][k]`: mean squared noise-prediction error under `prompts[p]`
    (target first, then the source, then contrast prompts) at the k-th (timestep, seed) pair, timestep-major."""

    text: float  # the margin: see text_margin; > 0 when the target prompt explains the image best
    prompts: tuple[str, ...]
    errors: tuple[tuple[float, ...], ...]
    unet_evals: int
    # how many of `prompts` are contrast prompts given by the caller (a manifest's qa_contrast)
    contrasts: int = 0
    # how many of `prompts` are contrast prompts derived from the prompt pair (JudgeConfig.derived_contrasts)
    derived: int = 0

    def as_dict(self) -> dict[str, float]:
        """The gate's metrics by name (what :meth:`Gate.check` reads): ``text``, and for an edit judged
        with a row's contrast prompts the same margin as ``contrast``, for one with derived contrast prompts as
        ``derived`` (a gate may give each its own threshold)."""
        if self.contrasts:
            return {"text": self.text, "contrast": self.text}
        return {"text": self.text, **({"derived": self.text} if self.derived else {})}


def text_margin(errors: torch.Tensor) -> torch.Tensor:
    """The ``text`` margin from errors (..., P, K) (target first, K samples): per sample, the lowest error
    under the other prompts minus the error under the target, divided by the mean error under all P
    prompts; then averaged over the K samples. Returns (...,).

    Against the closest alternative, as the zero-shot classifier decides (the prompt with the lowest error
    wins): an edit that shows some other value of its attribute loses to that value's prompt, however
    many others it beats (on the calibration edits, with every other value as contrasts and the default
    samples: colour AUC 0.98, shape 0.75; against the mean of the others 0.88 and 0.63). With the source
    prompt alone it is the plain target-vs-source gap. Dividing per sample makes it a relative gap (0.05 =
    the target prompt predicts the noise 5% better), comparable across images and timesteps whose raw
    errors differ by orders of magnitude.
    """
    if errors.shape[-2] < 2:
        raise ValueError(f"the margin needs at least 2 prompts, got {errors.shape[-2]}")
    gap = errors[..., 1:, :].amin(-2) - errors[..., 0, :]
    return (gap / errors.mean(-2).clamp_min(1e-12)).mean(-1)


def _by_shape(tensors: Sequence[torch.Tensor]) -> dict[tuple[int, ...], list[int]]:
    """The positions of `tensors` grouped by shape (each group batches into one tensor), in order."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault(tuple(t.shape), []).append(i)
    return groups


@torch.no_grad()
def judge_edits(
    model: EditModel,
    images: Sequence[Image.Image],
    source_prompts: Sequence[str],
    target_prompts: Sequence[str],
    config: JudgeConfig | None = None,
    contrast_prompts: Sequence[Sequence[str]] | None = None,
    *,
    size_policy: str = "fit",
) -> list[JudgeScore]:
    """Score edited images against their target prompts (Li et al. 2023, "Your Diffusion Model is Secretly a Zero-Shot Classifier")."""
    config = config or JudgeConfig()
    pixels = [model.prepare_image(img, size_policy) for img in images]
    latents: list[torch.Tensor | None] = [None] * len(pixels)
    for idxs in _by_shape(pixels).values():
        for b in range(0, len(idxs), config.max_batch):
            part = idxs[b : b + config.max_batch]
            z = model.encode_image(torch.cat([pixels[i] for i in part]))
            for i, zi in zip(part, z):
                latents[i] = zi
    return judge_latents(model, latents, source_prompts, target_prompts, config, contrast_prompts)  # type: ignore[arg-type]


@torch.no_grad()
def judge_latents(
    model: EditModel,
    latents: Sequence[torch.Tensor],
    source_prompts: Sequence[str],
    target_prompts: Sequence[str],
    config: JudgeConfig | None = None,
    contrast_prompts: Sequence[Sequence[str]] | None = None,
) -> list[JudgeScore]:
    """:func:`judge_edits` on scaled clean latents (C, h, w) each (an edit's final latents, or VAE-encoded images)."""
    config = config or JudgeConfig()
    # 1. Validate
    n = len(latents)
    if len(source_prompts) != n or len(target_prompts) != n:
        raise ValueError(
            f"{n} edits for {len(source_prompts)} source and {len(target_prompts)} target prompts"
        )
    if contrast_prompts is not None and len(contrast_prompts) != n:
        raise ValueError(f"{n} edits for {len(contrast_prompts)} contrast prompt lists")
    n_train = int(model.scheduler.config.num_train_timesteps)
    bad = [t for t in config.timesteps if t >= n_train]
    if bad:
        raise ValueError(
            f"JudgeConfig.timesteps {bad} are beyond this model's {n_train} training timesteps"
        )
    # target first, then the source, then contrast prompts: the caller's, else derived from the pair;
    # a prompt listed twice counts once
    given = [tuple(c) for c in contrast_prompts] if contrast_prompts is not None else [()] * n
    pairs = {(s, t) for c, s, t in zip(given, source_prompts, target_prompts) if not c}
    derive = {
        p: derive_contrasts(model, *p, config.derived_contrasts) for p in pairs
    }  # once a pair
    derived = [() if c else derive[s, t] for c, s, t in zip(given, source_prompts, target_prompts)]
    prompts = [
        tuple(dict.fromkeys((t, s, *c, *d)))
        for s, t, c, d in zip(source_prompts, target_prompts, given, derived)
    ]
    if not n:
        return []
    # 2. Encode prompts (each distinct prompt once) and lay out rows: edit x prompt x timestep x seed
    table = list(dict.fromkeys(p for ps in prompts for p in ps))
    index = {p: j for j, p in enumerate(table)}
    emb = model.encode_prompts(table)  # (U, L, D)
    dev, dt = model.device, model.latent_dtype
    k = len(config.timesteps) * len(config.seeds)
    ts = torch.tensor(config.timesteps, dtype=torch.long).repeat_interleave(len(config.seeds))
    alpha = model.scheduler.alphas_cumprod.to(dtype=torch.float64)[ts]  # (K,) per sample
    # 3. Score each group of same-shaped latents in chunks of max_batch rows; errors stay on the device
    errors: list[torch.Tensor | None] = [None] * n
    for shape, idxs in _by_shape(latents).items():
        noise = (
            torch.stack(  # (S, C, h, w): drawn on the CPU for reproducibility, used on the device
                [
                    torch.randn(shape, generator=torch.Generator("cpu").manual_seed(s), dtype=dt)
                    for s in config.seeds
                ]
            ).to(dev)
        )
        z0 = torch.stack([latents[i].to(dev, dt) for i in idxs])  # (E, C, h, w)
        rows = [(e, index[p]) for e, i in enumerate(idxs) for p in prompts[i]]  # host bookkeeping
        edit_of = torch.tensor([e for e, _ in rows], dtype=torch.long).repeat_interleave(k)
        prompt_of = torch.tensor([p for _, p in rows], dtype=torch.long).repeat_interleave(k)
        sample_of = torch.arange(k).repeat(len(rows))
        err = _errors(model, z0, noise, emb, alpha, ts, edit_of, prompt_of, sample_of, config)
        start = 0
        for i in idxs:
            size = len(prompts[i]) * k
            errors[i] = err[start : start + size].view(len(prompts[i]), k)
            start += size
    # 4. One transfer to the host, then the margins
    flat = torch.cat([e.reshape(-1) for e in errors]).double().cpu()  # type: ignore[union-attr]
    scores, start = [], 0
    for i in range(n):
        e = flat[start : start + len(prompts[i]) * k].view(len(prompts[i]), k)
        start += e.numel()
        ndrv = len(set(derived[i]) - {source_prompts[i], target_prompts[i]})
        scores.append(
            JudgeScore(  # an edit whose target is its source has nothing to compare: NaN
                text=float(text_margin(e)) if len(prompts[i]) > 1 else math.nan,
                prompts=tuple(prompts[i]),
                errors=tuple(tuple(row) for row in e.tolist()),
                unet_evals=e.numel(),
                contrasts=len(prompts[i]) - len({source_prompts[i], target_prompts[i]}) - ndrv,
                derived=ndrv,
            )
        )
    return scores


def _errors(
    model: EditModel,
    z0: torch.Tensor,
    noise: torch.Tensor,
    emb: torch.Tensor,
    alpha: torch.Tensor,
    ts: torch.Tensor,
    edit_of: torch.Tensor,
    prompt_of: torch.Tensor,
    sample_of: torch.Tensor,
    config: JudgeConfig,
) -> torch.Tensor:
    """Mean squared noise-prediction error (R,) of every row, in chunks of `config.max_batch` rows."""
    dev = z0.device
    n_seeds = len(config.seeds)
    # index tensors and the schedule on the UNet's device, once
    edit_of, prompt_of, sample_of = edit_of.to(dev), prompt_of.to(dev), sample_of.to(dev)
    a = alpha.to(dev, z0.dtype).view(-1, 1, 1, 1)  # (K, 1, 1, 1)
    ts = ts.to(dev)
    out = torch.empty(edit_of.shape[0], device=dev, dtype=z0.dtype)
    for b in range(0, edit_of.shape[0], config.max_batch):
        sl = slice(b, b + config.max_batch)
        e, p, s = edit_of[sl], prompt_of[sl], sample_of[sl]
        eps = noise[s % n_seeds]  # samples are timestep-major: sample k has seed k % S
        x = a[s].sqrt() * z0[e] + (1.0 - a[s]).sqrt() * eps  # (B, C, h, w)
        pred = model.unet(x.to(model.dtype), ts[s], encoder_hidden_states=emb[p]).sample
        _, eps_hat = split_output(pred, x, a[s], model.prediction_type)
        out[sl] = (eps_hat - eps).pow(2).flatten(1).mean(1)
    return out
