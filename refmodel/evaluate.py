"""Edit fidelity of a model on the shapes domain, scored automatically against the generator's ground truth.

    python -m refmodel.evaluate [--model refmodel/shapes-v1] [--sources 100] [--steps 50] [--out refmodel/eval]

Measures (on procedurally drawn source images, never on images sampled from the model):
1. text-to-image prompt following: colour, shape and background accuracy of generated images;
2. reconstruction through inversion: PSNR of the VAE round trip, of plain DDIM inversion + reconstruction
   (guidance 1 and 7.5), and of Direct Inversion (an edit whose target is the source prompt);
3. colour, shape and background swaps and restyles (plain -> outlined / striped / dotted) with each
   method: edit success (the target attribute or style is present), structure (mask IoU between the
   source's ground-truth mask and the edit's segmented mask; colour, background and style edits), background
   PSNR outside the object (colour, shape and style edits), and UNet evaluations per edit;
4. a contact sheet (source, then each method's edit) for people to look at.
Prints a table and writes ``metrics.json`` and ``contact_sheet.png`` into ``--out``.

    python -m refmodel.evaluate --gate CALIBRATION EVALUATION [--out DIR] [--gate-edits DIR]

measures the edit-QA gate instead (:mod:`editing.judge`): every kind of edit by GATE_METHODS on drawn
sources, each judged once on JUDGE_GRID; the judge's settings (timesteps, seeds: one setting for judging
against the source prompt and against every other value of the changed attribute) and a threshold per
prompt set (the gate's ``text`` and ``contrast`` rules) are chosen on the CALIBRATION sources, then the
gate's recall of failed edits and share of good edits flagged are scored on the EVALUATION sources
(another seed). Writes ``gate.json`` and the judged
edits (``gate_*.npz``, re-analysed without editing again by ``--gate-edits DIR``).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from editing.configs import P2PConfig, PnPConfig
from editing.contrasts import derive_contrasts, swap_span, whole_word_tokens
from editing.inversion import invert_many
from editing.judge import DEFAULT_GATE, JudgeConfig, judge_edits, parse_gate, text_margin
from editing.methods import SourceGroup, Target, edit
from editing.model import EditModel, load_model
from editing.sampling import denoise, generate
from refmodel import REFERENCE_MODEL_DIR, domain

logger = logging.getLogger(__name__)


def _methods() -> dict[str, Any]:
    """Method name -> config factory (source word, target word). P2P's "auto" kind is a word swap
    for swaps and a refine for restyles (the style adds words). "none" (inversion + target prompt,
    no control) is scored beside them. The defaults are the published procedures' Direct Inversion
    use (corrections on the source branch only); *_target_correction adds the source's corrections
    to the target rows too; pnp_published also injects into the unconditional row."""
    return {
        "p2p_swap": lambda old, new: P2PConfig(kind="auto"),
        "p2p_refine": lambda old, new: P2PConfig(kind="refine"),
        "p2p_reweight": lambda old, new: P2PConfig(kind="auto", equalizer={new: 2.0}),
        "p2p_swap_blend": lambda old, new: P2PConfig(
            kind="auto", blend_source_words=(old,), blend_target_words=(new,)
        ),
        "p2p_swap_self0.7": lambda old, new: P2PConfig(kind="auto", self_replace_steps=0.7),
        "p2p_target_correction": lambda old, new: P2PConfig(kind="auto", target_correction=True),
        "pnp": lambda old, new: PnPConfig(),
        "pnp_empty_source": lambda old, new: PnPConfig(source_text="empty"),
        "pnp_attn0.8": lambda old, new: PnPConfig(attn_t=0.8),
        "pnp_target_correction": lambda old, new: PnPConfig(target_correction=True),
        "pnp_published": lambda old, new: PnPConfig(inject_uncond=True),
    }


@dataclass
class _Scores:
    success: list[bool] = field(default_factory=list)
    iou: list[float] = field(default_factory=list)
    bg_psnr: list[float] = field(default_factory=list)
    evals: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        out = {
            "n": len(self.success),
            "success": float(np.mean(self.success)) if self.success else float("nan"),
        }
        out["iou"] = float(np.mean(self.iou)) if self.iou else float("nan")
        finite = [p for p in self.bg_psnr if np.isfinite(p)]
        out["bg_psnr"] = (
            float(np.mean(finite)) if finite else (float("inf") if self.bg_psnr else float("nan"))
        )
        out["unet_evals"] = float(np.mean(self.evals)) if self.evals else float("nan")
        return out


EDIT_KINDS = ("colour", "shape", "background", "style")


def _generated(model: EditModel, scenes: list[domain.Scene], steps: int, seed: int):
    """(scene, image generated from its caption) pairs, 16 prompts per batch."""
    size = (domain.IMAGE_SIZE, domain.IMAGE_SIZE)
    for start in range(0, len(scenes), 16):
        batch = scenes[start : start + 16]
        prompts = [domain.caption(s) for s in batch]
        yield from zip(
            batch, generate(model, prompts, num_steps=steps, seed=seed + start, size=size)
        )


def prompt_following(model: EditModel, n: int, steps: int, seed: int = 1000) -> dict[str, float]:
    """Accuracy of colour, shape and background of images generated from n full plain captions, and
    of the style of images generated from the same captions with a style (each style in turn)."""
    rng = np.random.default_rng(seed)
    scenes = [domain.sample_scene(rng) for _ in range(n)]
    styles = [st for st in domain.STYLES if st != "plain"]
    styled = [replace(s, style=styles[i % len(styles)]) for i, s in enumerate(scenes)]
    hits = {"colour": 0, "shape": 0, "background": 0, "style": 0}
    for s, img in _generated(model, scenes, steps, seed):
        mask = domain.segment(img)
        hits["colour"] += domain.classify_colour(img, mask) == s.colour
        hits["shape"] += domain.classify_shape(mask) == s.shape
        hits["background"] += domain.classify_background(img) == s.background
    for s, img in _generated(model, styled, steps, seed):
        hits["style"] += domain.classify_style(img) == s.style
    return {k: v / n for k, v in hits.items()}


def _outside(*masks: np.ndarray) -> np.ndarray:
    """Background region: outside every mask, dilated by one pixel (anti-aliased edges excluded)."""
    m = np.zeros_like(masks[0], bool)
    for x in masks:
        m |= x
    grown = m.copy()
    grown[1:] |= m[:-1]
    grown[:-1] |= m[1:]
    grown[:, 1:] |= m[:, :-1]
    grown[:, :-1] |= m[:, 1:]
    return ~grown


def _swap(
    scene: domain.Scene, kind: str, rng: np.random.Generator
) -> tuple[domain.Scene, str, str]:
    """The edited scene, the source word and the target word of a swap or restyle (`kind` in
    EDIT_KINDS). A restyle's source "word" is the shape (the object the style applies to: local blend
    keeps the edit there) and its target word the style."""
    if kind == "colour":
        new = str(rng.choice([c for c in domain.COLOURS if c != scene.colour]))
        return replace(scene, colour=new), scene.colour, new
    if kind == "background":
        new = str(rng.choice([b for b in domain.BACKGROUNDS if b != scene.background]))
        return replace(scene, background=new), scene.background, new
    if kind == "style":
        new = str(rng.choice([st for st in domain.STYLES if st not in ("plain", scene.style)]))
        return replace(scene, style=new), scene.shape, new
    new = str(rng.choice([s for s in domain.SHAPES if s != scene.shape]))
    return replace(scene, shape=new), scene.shape, new


def evaluate_edits(
    model: EditModel,
    n_sources: int,
    steps: int,
    *,
    methods: list[str] | None = None,
    seed: int = 7,
    sheet_rows: int = 6,
    batch_sources: int = 4,
    only: set[tuple[str, str]] | None = None,
) -> tuple[dict[str, Any], Image.Image]:
    """Reconstruction and swap-edit scores over `n_sources` drawn scenes; returns (metrics, contact sheet).

    Sources are processed `batch_sources` at a time: their edits share UNet batches (as in the pipeline).
    `only`: the (method, kind) edits to run (None: every method on every kind; the others score n = 0,
    and the sheet, which shows every method's colour edit, stays empty unless they all ran).
    """
    all_methods = _methods()
    names = methods or list(all_methods)
    rng = np.random.default_rng(seed)
    recon: dict[str, list[float]] = {
        "vae": [],
        "ddim_g1": [],
        "ddim_g7.5": [],
        "direct_inversion": [],
    }
    scores = {(m, k): _Scores() for m in ["none", *names] for k in EDIT_KINDS}
    sheet: list[list[Image.Image]] = []
    for first in range(0, n_sources, batch_sources):
        count = min(batch_sources, n_sources - first)
        scenes = [domain.sample_scene(rng) for _ in range(count)]
        rendered = [domain.render(s) for s in scenes]
        prompts = [domain.caption(s) for s in scenes]
        invs = invert_many(
            model, [img for img, _ in rendered], prompts, num_steps=steps, size_policy="exact"
        )
        z_t = torch.stack([inv.latents[-1] for inv in invs])
        for (img, _), z0 in zip(
            rendered, model.decode_latents(torch.stack([inv.latents[0] for inv in invs]))
        ):
            recon["vae"].append(domain.psnr(img, z0))
        for g, key in ((1.0, "ddim_g1"), (7.5, "ddim_g7.5")):
            z = denoise(model, z_t, prompts, num_steps=steps, guidance_scale=g)
            for (img, _), out in zip(rendered, model.decode_latents(z)):
                recon[key].append(domain.psnr(img, out))
        swaps = [{k: _swap(s, k, rng) for k in EDIT_KINDS} for s in scenes]
        # the no-control baseline: inversion, then plain denoising with the target prompt
        base_prompts = [domain.caption(sw[k][0]) for sw in swaps for k in EDIT_KINDS]
        base = model.decode_latents(
            denoise(model, z_t.repeat_interleave(len(EDIT_KINDS), 0), base_prompts, num_steps=steps)
        )
        groups, keys = [], []
        for inv, p, sw in zip(invs, prompts, swaps):
            # an unchanged target with the source's corrections: the Direct Inversion reconstruction
            targets, kk = [Target(p, PnPConfig(target_correction=True))], [("recon", None)]
            for kind, (new_scene, old_word, new_word) in sw.items():
                for m in (m for m in names if only is None or (m, kind) in only):
                    targets.append(
                        Target(domain.caption(new_scene), all_methods[m](old_word, new_word))
                    )
                    kk.append((m, kind))
            groups.append(SourceGroup(inv, targets))
            keys.append(kk)
        results = edit(model, groups, max_batch=64)
        for j in range(count):
            src_img, src_mask = rendered[j]
            inv, res, sw = invs[j], results[j], swaps[j]
            recon["direct_inversion"].append(domain.psnr(src_img, res[0].image))
            row = {"source": src_img}
            for b, kind in enumerate(EDIT_KINDS):
                img = base[len(EDIT_KINDS) * j + b]
                _score(
                    scores[("none", kind)],
                    img,
                    src_img,
                    src_mask,
                    sw[kind][0],
                    kind,
                    2.0 * steps + inv.unet_evals,
                )
                if kind == "colour":
                    row["none"] = img
            for (m, kind), r in zip(keys[j][1:], res[1:]):
                evals = (
                    r.unet_evals["source"]
                    + r.unet_evals["target"]
                    + inv.unet_evals / (len(res) - 1)
                )
                _score(scores[(m, kind)], r.image, src_img, src_mask, sw[kind][0], kind, evals)
                if kind == "colour":
                    row[m] = r.image
            if len(sheet) < sheet_rows and all(m in row for m in names):
                sheet.append([row["source"], row["none"], *[row[m] for m in names]])
        logger.info("sources %d/%d done", first + count, n_sources)
    metrics = {
        "reconstruction_psnr": {
            k: float(np.mean([p for p in v if np.isfinite(p)] or [float("inf")]))
            for k, v in recon.items()
        },
        "edits": {f"{m}/{k}": s.summary() for (m, k), s in scores.items()},
    }
    return metrics, contact_sheet(sheet, ["source", "none", *names])


def _score(
    s: _Scores,
    img: Image.Image,
    src: Image.Image,
    src_mask: np.ndarray,
    want: domain.Scene,
    kind: str,
    evals: float,
) -> None:
    mask = domain.segment(img)
    s.success.append(_succeeded(img, mask, want, kind))
    if kind != "shape":  # the object should keep its silhouette
        s.iou.append(domain.mask_iou(src_mask, mask))
    if kind != "background":  # the background should stay the source's
        region = _outside(src_mask, mask)
        s.bg_psnr.append(domain.psnr(src, img, region) if region.any() else float("nan"))
    s.evals.append(evals)


def _succeeded(img: Image.Image, mask: np.ndarray, want: domain.Scene, kind: str) -> bool:
    """Whether the edit's target attribute (or style) is present, by the pixel scorers."""
    if kind == "colour":
        return domain.classify_colour(img, mask) == want.colour
    if kind == "background":
        return domain.classify_background(img) == want.background
    if kind == "style":
        return domain.classify_style(img, mask) == want.style
    return domain.classify_shape(mask) == want.shape


def contact_sheet(rows: list[list[Image.Image]], labels: list[str], scale: int = 4) -> Image.Image:
    """A grid: one row per source, columns = source then each method's colour-swap edit, labelled."""
    if not rows:
        return Image.new("RGB", (1, 1))
    cell = rows[0][0].width * scale
    label_h = 14
    sheet = Image.new("RGB", (cell * len(labels), label_h + cell * len(rows)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for j, name in enumerate(labels):
        draw.text((j * cell + 2, 1), name[:18], fill=(0, 0, 0))
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            sheet.paste(
                img.resize((cell, cell), Image.Resampling.NEAREST), (j * cell, label_h + i * cell)
            )
    return sheet


# ----------------------------------------------------------------------------- edit QA: the gate


# The edits the gate is measured on: the recommended methods and two that fail more often (so that
# every kind has failed edits to find).
GATE_METHODS = ("pnp", "p2p_swap", "pnp_attn0.8", "p2p_swap_self0.7")
# What every edit is judged with once; the settings under test are subsets of it (same noise per seed).
JUDGE_GRID = JudgeConfig(timesteps=tuple(range(50, 1000, 100)), seeds=(0, 1), max_batch=64)
# target vs the source prompt (no contrast prompts: the gate's `text` rule) / vs the source and every
# other value of the changed attribute (as a manifest's qa_contrast column would list them: `contrast`)
GATE_PROMPT_SETS = ("source", "attribute")
GATE_METRIC = {"source": "text", "attribute": "contrast"}
GATE_BUDGET = 8  # (timestep, seed) samples per edit at most: 2 prompts x 8 = 16 UNet evaluations
# share of good calibration edits the threshold may flag: 12%, so that the held-out share stays <= 15%
# (the target) with some margin; held in each of these groups (the targets are per kind)
GATE_MAX_FLAGGED = 0.12
GATE_FLAG_KINDS = ("colour", "background", "overall")
# what the settings are chosen for: the targets, recall of failed colour, background and all edits
GATE_RECALL_KINDS = ("colour", "background", "overall")


@dataclass
class JudgedEdit:
    """One edit of the gate evaluation: its ground truth and the judge's errors on JUDGE_GRID."""

    kind: str  # one of EDIT_KINDS
    method: str
    success: bool  # the target attribute is present (pixel scorers)
    # (P, K) errors: prompts [target, source, every other value of the changed attribute, then (with
    # substitutions) the target with every whole-word token in place of its word], samples of the grid
    # judged on, timestep-major (JudgeScore.errors)
    errors: np.ndarray
    prompts: tuple[str, ...] = ()  # the P prompts (stored with substitutions)
    attribute_rows: int = (
        0  # how many rows are target, source and attribute prompts; 0 = all of them
    )


def _attribute_prompts(scene: domain.Scene, kind: str) -> list[str]:
    """Captions of `scene` with every other value of the attribute a `kind` edit changes."""
    values = {
        "colour": domain.COLOURS,
        "shape": domain.SHAPES,
        "background": domain.BACKGROUNDS,
        "style": domain.STYLES,
    }[kind]
    name = kind  # the kinds are named after the scene's fields
    return [
        domain.caption(replace(scene, **{name: v})) for v in values if v != getattr(scene, name)
    ]


def judged_edits(
    model: EditModel,
    n_sources: int,
    steps: int,
    *,
    methods: tuple[str, ...] = GATE_METHODS,
    seed: int = 11,
    grid: JudgeConfig = JUDGE_GRID,
    batch_sources: int = 4,
    substitutions: bool = False,
) -> list[JudgedEdit]:
    """Draw `n_sources` scenes, give each a swap of every kind with each method, score every edit
    against the ground truth and judge it on `grid` against every value of the changed attribute (and
    with `substitutions`, a swap also against its target with every whole-word token in place of the
    target word: what derived contrast prompts pick from). The first sources of a seed are the same
    edits whatever `n_sources`."""
    all_methods = _methods()
    rng = np.random.default_rng(seed)
    out: list[JudgedEdit] = []
    for first in range(0, n_sources, batch_sources):
        count = min(batch_sources, n_sources - first)
        scenes = [domain.sample_scene(rng) for _ in range(count)]
        prompts = [domain.caption(s) for s in scenes]
        invs = invert_many(
            model, [domain.render(s)[0] for s in scenes], prompts, num_steps=steps,
            size_policy="exact",
        )  # fmt: skip
        groups, wanted = [], []
        for inv, scene in zip(invs, scenes):
            targets = []
            for kind in EDIT_KINDS:
                new_scene, old_word, new_word = _swap(scene, kind, rng)
                for m in methods:
                    targets.append(
                        Target(domain.caption(new_scene), all_methods[m](old_word, new_word))
                    )
                    wanted.append((kind, m, scene, new_scene))
            groups.append(SourceGroup(inv, targets))
        images = [r.image for res in edit(model, groups, max_batch=64) for r in res]
        attribute = [_attribute_prompts(new, kind) for kind, _, _, new in wanted]
        extra = [
            _substitutions(model, domain.caption(src), domain.caption(new)) if substitutions else []
            for _, _, src, new in wanted
        ]
        scores = judge_edits(
            model,
            images,
            [domain.caption(src) for _, _, src, _ in wanted],
            [domain.caption(new) for _, _, _, new in wanted],
            grid,
            contrast_prompts=[a + x for a, x in zip(attribute, extra)],
            size_policy="exact",
        )
        for img, (kind, m, _, new), sc, a in zip(images, wanted, scores, attribute):
            ok = _succeeded(img, domain.segment(img), new, kind)
            rows = len(
                {domain.caption(new), *a}
            )  # target + attribute prompts (the source among them)
            out.append(JudgedEdit(kind, m, bool(ok), np.asarray(sc.errors),
                                  sc.prompts if substitutions else (), rows if substitutions else 0))  # fmt: skip
        logger.info("gate: sources %d/%d judged", first + count, n_sources)
    return out


@dataclass(frozen=True)
class GateChoice:
    """Judge settings and threshold, chosen on the calibration edits."""

    prompts: str  # one of GATE_PROMPT_SETS
    timesteps: tuple[int, ...]
    seeds: tuple[int, ...]
    threshold: float  # flag an edit when its text margin is below this

    def samples(self, grid: JudgeConfig = JUDGE_GRID) -> list[int]:
        """Columns of JudgedEdit.errors these settings read (timestep-major, as the judge lays them)."""
        s = len(grid.seeds)
        return [
            grid.timesteps.index(t) * s + grid.seeds.index(seed)
            for t in self.timesteps
            for seed in self.seeds
        ]


def gate_margins(edits: list[JudgedEdit], choice: GateChoice) -> np.ndarray:
    """Each edit's text margin under `choice`'s prompts and samples (the judge's own formula)."""
    cols = choice.samples()
    out = []
    for e in edits:
        err = e.errors[: 2 if choice.prompts == "source" else (e.attribute_rows or None)][:, cols]
        out.append(float(text_margin(torch.from_numpy(err))))
    return np.asarray(out)


def _auc(bad: np.ndarray, good: np.ndarray) -> float:
    """P(a failed edit's margin < a good edit's), ties counted half (nan without both)."""
    if not len(bad) or not len(good):
        return float("nan")
    less = (bad[:, None] < good[None, :]).mean()
    ties = (bad[:, None] == good[None, :]).mean()
    return float(less + 0.5 * ties)


def gate_rates(edits: list[JudgedEdit], margins: np.ndarray, threshold: float) -> dict[str, dict]:
    """Per kind and overall: edits, failed, recall of failed edits, share of good edits flagged, AUC."""
    out = {}
    for kind in (*EDIT_KINDS, "overall"):
        sel = np.asarray([kind in ("overall", e.kind) for e in edits])
        ok = np.asarray([e.success for e in edits])[sel]
        m = margins[sel]
        flagged = m < threshold
        out[kind] = {
            "n": int(sel.sum()),
            "failed": int((~ok).sum()),
            "recall": float(flagged[~ok].mean()) if (~ok).any() else float("nan"),
            "flagged_good": float(flagged[ok].mean()) if ok.any() else float("nan"),
            "auc": _auc(m[~ok], m[ok]),
        }
    return out


def _candidate_timesteps(grid: JudgeConfig) -> list[tuple[int, ...]]:
    """Evenly spaced runs of the grid's timesteps (stride 1-3), each a candidate setting."""
    ts, out = grid.timesteps, []
    for stride in (1, 2, 3):
        for lo in range(len(ts)):
            for hi in range(lo + 1, len(ts) + 1):
                cand = ts[lo:hi:stride]
                if cand not in out:
                    out.append(cand)
    return out


def gate_threshold(
    edits: list[JudgedEdit], margins: np.ndarray, max_flagged: float = GATE_MAX_FLAGGED
) -> float:
    """The highest threshold that flags at most `max_flagged` of the good edits in each of
    GATE_FLAG_KINDS (groups without good edits are skipped)."""
    ok = np.asarray([e.success for e in edits])
    kinds = np.asarray([e.kind for e in edits])
    limits = [
        float(np.quantile(margins[sel], max_flagged, method="lower"))
        for k in GATE_FLAG_KINDS
        if (sel := ok & ((kinds == k) | (k == "overall"))).any()
    ]
    return min(limits)


def choose_gate(
    edits: list[JudgedEdit],
    prompt_sets: tuple[str, ...] = GATE_PROMPT_SETS,
    *,
    grid: JudgeConfig = JUDGE_GRID,
    budget: int = GATE_BUDGET,
    max_flagged: float = GATE_MAX_FLAGGED,
) -> tuple[list[GateChoice], list[dict[str, dict]]]:
    """One judge setting (timesteps, seeds within `budget` samples) for every prompt set, and a threshold
    per prompt set (:func:`gate_threshold`): the setting with the best recall of GATE_RECALL_KINDS on
    `edits`, averaged over the prompt sets (a run's one JudgeConfig serves edits with and without
    contrast prompts); fewer samples win ties. Returns the choices and their rates on `edits`."""
    best = None
    for ts in _candidate_timesteps(grid):
        for n_seeds in range(1, len(grid.seeds) + 1):
            if len(ts) * n_seeds > budget:
                continue
            choices, all_rates, recalls = [], [], []
            for prompts in prompt_sets:
                probe = GateChoice(prompts, ts, grid.seeds[:n_seeds], 0.0)
                m = gate_margins(edits, probe)
                # at the 4 significant digits a gate spec shows (what runs is what is measured)
                threshold = float(f"{gate_threshold(edits, m, max_flagged):.4g}")
                rates = gate_rates(edits, m, threshold)
                choices.append(replace(probe, threshold=threshold))
                all_rates.append(rates)
                recalls.append(np.nanmean([rates[k]["recall"] for k in GATE_RECALL_KINDS]))
            key = (float(np.mean(recalls)), -len(ts) * n_seeds)
            if best is None or key > best[0]:
                best = (key, choices, all_rates)
    assert best is not None
    return best[1], best[2]


def evaluate_gate(cal: list[JudgedEdit], ev: list[JudgedEdit]) -> dict[str, Any]:
    """Choose the judge's settings and thresholds on the calibration edits `cal`, then score them on the
    evaluation edits `ev` (other sources): per prompt set, the chosen settings and both tables."""
    out: dict[str, Any] = {
        "methods": sorted({e.method for e in cal}),
        "calibration_edits": len(cal),
        "evaluation_edits": len(ev),
        "grid": {"timesteps": list(JUDGE_GRID.timesteps), "seeds": list(JUDGE_GRID.seeds)},
        "budget": GATE_BUDGET,
        "max_flagged": GATE_MAX_FLAGGED,
    }
    choices, cal_rates = choose_gate(cal)  # everything fixed here, before `ev` is scored
    out["gate"] = ",".join(f"{GATE_METRIC[c.prompts]}>={c.threshold:g}" for c in choices)
    out["variants"] = []
    for choice, rates in zip(choices, cal_rates):
        out["variants"].append({
            "prompts": choice.prompts,
            "metric": GATE_METRIC[choice.prompts],
            "timesteps": list(choice.timesteps),
            "seeds": list(choice.seeds),
            "threshold": choice.threshold,
            "calibration": rates,
            "evaluation": gate_rates(ev, gate_margins(ev, choice), choice.threshold),
            "unet_evals": _mean_evals(ev, choice),
        })  # fmt: skip
    return out


def _mean_evals(edits: list[JudgedEdit], choice: GateChoice) -> dict[str, float]:
    """UNet evaluations per edit of `choice`, per kind (the prompt count differs by kind)."""
    out = {}
    for kind in (*EDIT_KINDS, "overall"):
        n = [
            (2 if choice.prompts == "source" else e.attribute_rows or e.errors.shape[0])
            * len(choice.samples())
            for e in edits
            if kind in ("overall", e.kind)
        ]
        out[kind] = float(np.mean(n)) if n else float("nan")
    return out


# ----------------------------------------------------------------------------- edit QA: derived contrasts


# the derived contrast counts tried, with the default JudgeConfig's timesteps and 1 or 2 of its seeds,
# within the 16 UNet evaluations per edit: (2 + n) x samples <= 16
DERIVED_BUDGET = 16


def _substitutions(model: EditModel, source: str, target: str) -> list[str]:
    """`target` with every whole-word token (editing.contrasts) in place of its swapped span; [] when the
    pair is not a word swap. Every derived contrast prompt is among them."""
    span = swap_span(source, target)
    if span is None:
        return []
    start, end, new, old = span
    words = whole_word_tokens(model.tokenizer)[1]
    return [target[:start] + w + target[end:] for w in words if w not in (new, old)]


@dataclass(frozen=True)
class DerivedChoice:
    """A derived-contrast setting: how many, which of the judged samples, the `derived` threshold."""

    n: int
    samples: tuple[int, ...]  # columns of JudgedEdit.errors (the default timesteps x seeds, judged)
    threshold: float


def derived_margins(model: EditModel, edits: list[JudgedEdit], choice: DerivedChoice) -> np.ndarray:
    """Each edit's margin against its source prompt and the `choice.n` contrast prompts the judge would
    derive (editing.contrasts.derive_contrasts), on `choice.samples`: for an edit that is not a word
    swap (a restyle) its margin against the source prompt alone."""
    out = []
    for e in edits:
        derived = derive_contrasts(model, e.prompts[1], e.prompts[0], choice.n)
        rows = [0, 1, *(e.prompts.index(p) for p in derived)]
        out.append(float(text_margin(torch.from_numpy(e.errors[rows][:, list(choice.samples)]))))
    return np.asarray(out)


def _has_derived(edits: list[JudgedEdit]) -> np.ndarray:
    """Which edits are word swaps (judged with derived contrast prompts)."""
    return np.asarray([swap_span(e.prompts[1], e.prompts[0]) is not None for e in edits])


def _gated(model, edits, choice: DerivedChoice, text_threshold: float) -> np.ndarray:
    """Margin minus the threshold its rule holds it to: `derived` for swaps, `text` (source prompt, the
    default samples) for the rest; < 0 = flagged."""
    m = derived_margins(model, edits, choice)
    src = derived_margins(model, edits, replace(choice, n=0, samples=(0, 1, 2, 3)))
    return np.where(_has_derived(edits), m - choice.threshold, src - text_threshold)


def evaluate_derived(
    model: EditModel,
    cal: list[JudgedEdit],
    ev: list[JudgedEdit],
    text_threshold: float,
    contrast_threshold: float,
) -> dict[str, Any]:
    """Choose the derived contrast count and samples (within DERIVED_BUDGET) and the `derived` threshold
    on the calibration edits `cal` (the highest flagging at most GATE_MAX_FLAGGED of good swaps of
    colour, background and all kinds; best mean recall of GATE_RECALL_KINDS, then AUC, then fewer
    evaluations), then score the evaluation edits `ev`. Edits are judged at the default timesteps x
    seeds (4 samples, seed-minor); restyles keep the `text` rule at `text_threshold`. Beside it, on the
    same evaluation edits: judged against the source prompt alone (`text_threshold`) and against every
    other value of the attribute (a filled qa_contrast column, `contrast_threshold`)."""
    best = None
    for samples in ((0, 1, 2, 3), (0, 2)):
        for n in range(1, DERIVED_BUDGET // len(samples) - 1):
            probe = DerivedChoice(n, samples, 0.0)
            swaps = _has_derived(cal)
            m = derived_margins(model, cal, probe)
            sw = [e for e, ok in zip(cal, swaps) if ok]
            threshold = float(f"{gate_threshold(sw, m[swaps]):.4g}")
            choice = replace(probe, threshold=threshold)
            rates = gate_rates(cal, _gated(model, cal, choice, text_threshold), 0.0)
            key = (
                float(np.nanmean([rates[k]["recall"] for k in GATE_RECALL_KINDS])),
                float(np.nanmean([rates[k]["auc"] for k in GATE_RECALL_KINDS])),
                -(2 + n) * len(samples),
            )
            if best is None or key > best[0]:
                best = (key, choice, rates)
    assert best is not None
    _, choice, cal_rates = best  # everything fixed here, before `ev` is scored
    every = (0, 1, 2, 3)
    src = derived_margins(model, ev, DerivedChoice(0, every, 0.0))
    attr = np.asarray([float(text_margin(torch.from_numpy(e.errors[: e.attribute_rows])))
                       for e in ev])  # fmt: skip
    return {
        "source": gate_rates(ev, src - text_threshold, 0.0),
        "attribute": gate_rates(ev, attr - contrast_threshold, 0.0),
        "n": choice.n,
        "samples": list(choice.samples),
        "threshold": choice.threshold,
        "text_threshold": text_threshold,
        "unet_evals_swap": (2 + choice.n) * len(choice.samples),
        "calibration": cal_rates,
        "evaluation": gate_rates(ev, _gated(model, ev, choice, text_threshold), 0.0),
    }


def judge_seconds(
    model: EditModel, config: JudgeConfig, n: int = 64, seed: int = 13, *, contrasts: bool = False
) -> float:
    """Seconds per edit the judge takes with `config` on `n` rendered colour swaps: target vs source
    prompt, or with `contrasts` also vs every other colour (6 prompts: the dearest kind)."""
    rng = np.random.default_rng(seed)
    scenes = [domain.sample_scene(rng) for _ in range(n)]
    swapped = [_swap(s, "colour", rng)[0] for s in scenes]
    images = [domain.render(s)[0] for s in swapped]
    sources = [domain.caption(s) for s in scenes]
    targets = [domain.caption(s) for s in swapped]
    extra = [_attribute_prompts(s, "colour") for s in swapped] if contrasts else None
    judge_edits(model, images[:2], sources[:2], targets[:2], config, extra and extra[:2],
                size_policy="exact")  # warm-up  # fmt: skip
    t0 = time.perf_counter()
    judge_edits(model, images, sources, targets, config, extra, size_policy="exact")
    return (time.perf_counter() - t0) / n


def save_judged(path: Path, edits: list[JudgedEdit]) -> None:
    """The judged edits as an .npz (re-analysed by --gate-edits without editing again)."""
    errors = np.empty(len(edits), dtype=object)  # one (P, K) array per edit; P differs by kind
    prompts = np.empty(len(edits), dtype=object)
    for i, e in enumerate(edits):
        errors[i] = e.errors
        prompts[i] = np.asarray(e.prompts, dtype=str)
    np.savez_compressed(
        path,
        kind=np.asarray([e.kind for e in edits]),
        method=np.asarray([e.method for e in edits]),
        success=np.asarray([e.success for e in edits]),
        errors=errors,
        prompts=prompts,
        attribute_rows=np.asarray([e.attribute_rows for e in edits]),
    )


def load_judged(path: Path) -> list[JudgedEdit]:
    z = np.load(path, allow_pickle=True)  # our own file, written by save_judged
    n = len(z["kind"])
    prompts = z["prompts"] if "prompts" in z else [()] * n  # files written before prompts were kept
    rows = z["attribute_rows"] if "attribute_rows" in z else [0] * n
    return [
        JudgedEdit(
            str(k),
            str(m),
            bool(ok),
            np.asarray(e, dtype=np.float64),
            tuple(str(x) for x in p),
            int(r),
        )  # fmt: skip
        for k, m, ok, e, p, r in zip(
            z["kind"], z["method"], z["success"], z["errors"], prompts, rows
        )
    ]


def format_gate_table(gate: dict[str, Any]) -> str:
    """The gate's recall of failed edits and share of good edits flagged, per kind, per prompt set."""
    lines = [
        f"gate: methods {', '.join(gate['methods'])}; {gate['calibration_edits']} calibration and "
        f"{gate['evaluation_edits']} evaluation edits (other sources)"
    ]
    for g in gate["variants"]:
        lines.append(
            f"prompts {g['prompts']}: timesteps {g['timesteps']} seeds {g['seeds']} threshold "
            f"{g['metric']}>={g['threshold']:.4f}"
        )
        lines.append(
            f"  {'kind':<12}{'edits':>6}{'failed':>7}{'recall':>8}{'good flagged':>14}{'AUC':>6}"
            f"{'evals':>7}   (calibration recall / flagged / AUC)"
        )
        for kind, r in g["evaluation"].items():
            c = g["calibration"][kind]
            lines.append(
                f"  {kind:<12}{r['n']:>6}{r['failed']:>7}{r['recall']:>8.0%}"
                f"{r['flagged_good']:>14.0%}{r['auc']:>6.2f}{g['unet_evals'][kind]:>7.0f}"
                f"   ({c['recall']:.0%} / {c['flagged_good']:.0%} / {c['auc']:.2f})"
            )
    return "\n".join(lines)


def format_table(metrics: dict[str, Any]) -> str:
    lines = []
    pf = metrics.get("prompt_following")
    if pf:
        lines.append("prompt following: " + ", ".join(f"{k} {v:.0%}" for k, v in pf.items()))
    lines.append(
        "reconstruction PSNR (dB): "
        + ", ".join(f"{k} {v:.2f}" for k, v in metrics["reconstruction_psnr"].items())
    )
    lines.append(
        f"{'method/swap':<28}{'n':>5}{'success':>9}{'IoU':>7}{'bg PSNR':>9}{'UNet evals':>12}"
    )
    for name, s in metrics["edits"].items():
        iou = f"{s['iou']:.3f}" if np.isfinite(s["iou"]) else "-"
        bg = f"{s['bg_psnr']:.2f}" if not np.isnan(s["bg_psnr"]) else "-"
        lines.append(
            f"{name:<28}{s['n']:>5}{s['success']:>9.0%}{iou:>7}{bg:>9}{s['unet_evals']:>12.1f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(REFERENCE_MODEL_DIR))
    p.add_argument(
        "--sources",
        type=int,
        default=100,
        help="drawn source images (each gets a colour and a shape swap)",
    )
    p.add_argument(
        "--generate", type=int, default=300, help="images generated for prompt following"
    )
    p.add_argument("--steps", type=int, default=50)
    p.add_argument(
        "--out",
        default="out/refmodel-eval",
        help="where metrics.json and contact_sheet.png go (refmodel/eval holds the committed ones)",
    )
    p.add_argument("--methods", nargs="*", default=None, help=f"subset of {list(_methods())}")
    p.add_argument(
        "--gate",
        nargs=2,
        type=int,
        metavar=("CALIBRATION", "EVALUATION"),
        help="instead: measure the edit-QA gate, with settings chosen on CALIBRATION sources and "
        f"scored on EVALUATION other sources (methods {', '.join(GATE_METHODS)}); writes gate.json",
    )
    p.add_argument(
        "--gate-derived",
        nargs=2,
        type=int,
        metavar=("CALIBRATION", "EVALUATION"),
        help="instead: measure derived contrast prompts on the first CALIBRATION and EVALUATION sources "
        "of --gate's (the same edits), at the default judge samples; writes gate_derived.json",
    )
    p.add_argument(
        "--gate-edits",
        default=None,
        help="with --gate: re-analyse the judged edits saved in this folder (gate_*.npz) instead",
    )
    p.add_argument(
        "--judge-seconds",
        type=int,
        default=0,
        metavar="N",
        help="instead: time the edit-QA judge with its default settings on N rendered edits",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.manual_seed(0)
    if args.judge_seconds:
        seconds = judge_seconds(load_model(args.model), JudgeConfig(), n=args.judge_seconds)
        print(f"judge, default settings ({JudgeConfig().unet_evals()} UNet evaluations per edit): "
              f"{seconds * 1000:.0f} ms per edit on {torch.get_num_threads()} CPU thread(s)")  # fmt: skip
        return None
    if args.gate_derived:
        return _main_derived(args)
    if args.gate:
        return _main_gate(args)
    model = load_model(args.model)
    t0 = time.perf_counter()
    metrics: dict[str, Any] = {
        "model": args.model,
        "revision": model.revision,
        "steps": args.steps,
        "sources": args.sources,
    }
    metrics["prompt_following"] = (
        prompt_following(model, args.generate, args.steps) if args.generate else {}
    )
    edits, sheet = evaluate_edits(model, args.sources, args.steps, methods=args.methods)
    metrics.update(edits)
    metrics["seconds"] = time.perf_counter() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    sheet.save(out / "contact_sheet.png")
    print(format_table(metrics))
    print(
        f"wrote {out / 'metrics.json'} and {out / 'contact_sheet.png'} in {metrics['seconds']:.0f}s"
    )


def _main_gate(args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = load_model(args.model)
    if args.gate_edits:
        cal = load_judged(Path(args.gate_edits) / "gate_calibration.npz")
        ev = load_judged(Path(args.gate_edits) / "gate_evaluation.npz")
    else:
        n_cal, n_ev = args.gate
        cal = judged_edits(model, n_cal, args.steps, seed=11)
        ev = judged_edits(model, n_ev, args.steps, seed=12)
        save_judged(out / "gate_calibration.npz", cal)
        save_judged(out / "gate_evaluation.npz", ev)
    gate = evaluate_gate(cal, ev) | {"steps": args.steps}
    default = gate["variants"][0]
    config = JudgeConfig(timesteps=tuple(default["timesteps"]), seeds=tuple(default["seeds"]))
    gate["judge_seconds_per_edit"] = judge_seconds(model, config)
    gate["judge_seconds_per_colour_edit_with_contrasts"] = judge_seconds(
        model, config, contrasts=True
    )
    gate["threads"] = torch.get_num_threads()
    gate["seconds"] = time.perf_counter() - t0
    (out / "gate.json").write_text(json.dumps(gate, indent=2) + "\n")
    print(format_gate_table(gate))
    print(
        f"gate {gate['gate']}; judge with these settings: {config.unet_evals()} UNet evaluations, "
        f"{gate['judge_seconds_per_edit'] * 1000:.0f} ms per edit (a colour edit with contrasts: "
        f"{config.unet_evals(6)}, {gate['judge_seconds_per_colour_edit_with_contrasts'] * 1000:.0f} ms)"
        f" on {gate['threads']} CPU thread(s)"
    )
    print(f"wrote {out / 'gate.json'} in {gate['seconds']:.0f}s")


def _main_derived(args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = load_model(args.model)
    files = [out / "gate_derived_calibration.npz", out / "gate_derived_evaluation.npz"]
    if args.gate_edits:
        cal, ev = (load_judged(Path(args.gate_edits) / f.name) for f in files)
    else:
        cal, ev = (
            judged_edits(model, n, args.steps, seed=seed, grid=JudgeConfig(), substitutions=True)
            for n, seed in zip(args.gate_derived, (11, 12))
        )
        save_judged(files[0], cal)
        save_judged(files[1], ev)
    rules = {r.metric: r.threshold for r in parse_gate(DEFAULT_GATE).rules}
    result = evaluate_derived(model, cal, ev, rules["text"], rules["contrast"])
    result |= {"calibration_edits": len(cal), "evaluation_edits": len(ev)}
    result["seconds"] = time.perf_counter() - t0
    (out / "gate_derived.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"derived contrasts: {result['n']} on samples {result['samples']} (a swap: "
          f"{result['unet_evals_swap']} UNet evaluations), derived>={result['threshold']:g}; "
          f"{len(cal)} calibration / {len(ev)} evaluation edits")  # fmt: skip
    for name in ("source", "evaluation", "attribute"):
        print(f"  {name:<11}" + "".join(
            f"{k} {r['recall']:.0%}/{r['flagged_good']:.0%}/{r['auc']:.2f}  "
            for k, r in result[name].items()))  # fmt: skip


if __name__ == "__main__":
    main()
