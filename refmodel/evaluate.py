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
from editing.inversion import invert_many
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
) -> tuple[dict[str, Any], Image.Image]:
    """Reconstruction and swap-edit scores over `n_sources` drawn scenes; returns (metrics, contact sheet).

    Sources are processed `batch_sources` at a time: their edits share UNet batches (as in the pipeline).
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
                for m in names:
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
            if len(sheet) < sheet_rows:
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
    if kind == "colour":
        s.success.append(domain.classify_colour(img, mask) == want.colour)
    elif kind == "background":
        s.success.append(domain.classify_background(img) == want.background)
    elif kind == "style":
        s.success.append(domain.classify_style(img, mask) == want.style)
    else:
        s.success.append(domain.classify_shape(mask) == want.shape)
    if kind != "shape":  # the object should keep its silhouette
        s.iou.append(domain.mask_iou(src_mask, mask))
    if kind != "background":  # the background should stay the source's
        region = _outside(src_mask, mask)
        s.bg_psnr.append(domain.psnr(src, img, region) if region.any() else float("nan"))
    s.evals.append(evals)


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
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.manual_seed(0)
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


if __name__ == "__main__":
    main()
