"""The engine's output corpus: a fixed set of edits whose latents and images are hashed, so that a change to
the engine's batching or plans can be shown bit-identical (run before and after; diff the two files).

usage: python -m benchmarks.engine_corpus [--out hashes.txt] [--quick]

Covers the bundled model (refmodel/shapes-v2) and a tiny SD-shaped model built from a config, each in fp32
and fp64, at max_batch 8, 3 and 1: PnP (default, inject_uncond, empty source text, target correction) live
with its features recorded and then replayed from them, and Prompt-to-Prompt (replace, refine, reweight,
local blend), all in one mixed ``edit`` call per setting. Each line: ``sha256  name``, where a name is
``model/dtype/mb{N}/{live|replay}/g{group}t{target}/{latent|image}``.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from editing import P2PConfig, PnPConfig, SourceGroup, Target, edit, load_model
from editing.inversion import invert_many
from refmodel.toy import TINY, build_toy_pipeline

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "refmodel" / "shapes-v2"
SCENES = ROOT / "manifests" / "examples" / "images"
STEPS = 10
MAX_BATCHES = (8, 3, 1)


def _tiny_image(seed: int, size: int = 16) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.uniform(0, 255, size=(4, 4, 3)).astype(np.uint8)
    return Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC)


def _sources(name: str) -> list[tuple[Image.Image, str]]:
    if name == "bundled":
        return [
            (Image.open(SCENES / "scene-0.png").convert("RGB"), "a yellow triangle on a black background"),
            (Image.open(SCENES / "scene-1.png").convert("RGB"), "a yellow circle on a white background"),
        ]  # fmt: skip
    return [
        (_tiny_image(0), "a photo of a cat"),
        (_tiny_image(1), "a photo of a dog on gray background"),
    ]


def _targets(name: str, source: str) -> list[Target]:
    """Every kind of edit of one source (words chosen to exist in the source prompt)."""
    words = source.split()
    noun = words[2] if name == "bundled" else words[4]  # triangle/circle; cat/dog
    adjective = "dotted" if name == "bundled" else "big"  # a word of each model's vocabulary
    swapped = " ".join("square" if w == noun else w for w in words)
    refined = " ".join(f"{adjective} {w}" if w == noun else w for w in words)
    return [
        Target(swapped, PnPConfig(), edit_id="pnp"),
        Target(swapped, PnPConfig(inject_uncond=True, attn_t=0.3), edit_id="pnp-uncond"),
        Target(swapped, PnPConfig(target_correction=True, feature_t=0.5), edit_id="pnp-corr"),
        Target(swapped, P2PConfig(kind="replace"), edit_id="p2p-replace"),
        Target(refined, P2PConfig(kind="refine"), edit_id="p2p-refine"),
        Target(source, P2PConfig(kind="reweight", equalizer={noun: 2.0}), edit_id="p2p-reweight"),
        Target(
            swapped,
            P2PConfig(kind="replace", blend_source_words=(noun,), blend_target_words=("square",)),
            edit_id="p2p-blend",
        ),
    ]


def _empty_text_targets(source: str) -> list[Target]:
    """PnP with the empty source text shares no chunk with the others (a group of its own)."""
    return [
        Target(source.replace("a ", "the ", 1), PnPConfig(source_text="empty"), edit_id="pnp-empty")
    ]


def _digest(t: torch.Tensor | Image.Image) -> str:
    if isinstance(t, Image.Image):
        return hashlib.sha256(np.asarray(t).tobytes()).hexdigest()
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def corpus(name: str, folder: Path, dtype: torch.dtype, max_batches=MAX_BATCHES) -> list[str]:
    """The hash lines of one model in one dtype."""
    model = load_model(folder, dtype=dtype)
    srcs = _sources(name)
    invs = invert_many(model, [im for im, _ in srcs], [p for _, p in srcs], num_steps=STEPS)
    lines = []
    tag = f"{name}/{str(dtype).removeprefix('torch.')}"
    for i, inv in enumerate(invs):
        lines.append(f"{_digest(inv.latents)}  {tag}/inversion{i}/latents")
    for mb in max_batches:
        groups = [SourceGroup(inv, _targets(name, p)) for inv, (_, p) in zip(invs, srcs)]
        groups += [SourceGroup(invs[0], _empty_text_targets(srcs[0][1]))]
        live = edit(model, groups, max_batch=mb, record_features=True)
        replay_groups = []
        for g, res in zip(groups, live):
            feats = next(r.features for r, t in zip(res, g.targets) if r.features is not None)
            pnp = [t for t in g.targets if isinstance(t.config, PnPConfig)]
            replay_groups.append(SourceGroup(g.inversion, pnp, features=feats))
        replay = edit(model, replay_groups, max_batch=mb)
        for kind, gs, results in (("live", groups, live), ("replay", replay_groups, replay)):
            for gi, (g, res) in enumerate(zip(gs, results)):
                for t, r in zip(g.targets, res):
                    if isinstance(r, Exception):
                        raise r
                    base = f"{tag}/mb{mb}/{kind}/g{gi}/{t.edit_id}"
                    lines.append(f"{_digest(r.latent)}  {base}/latent")
                    lines.append(f"{_digest(r.image)}  {base}/image")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="also write the lines to this file")
    ap.add_argument("--quick", action="store_true", help="the tiny model in fp32 only, max_batch 3")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    lines: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        tiny = build_toy_pipeline(Path(tmp) / "tiny", TINY, seed=0)
        if args.quick:
            lines += corpus("tiny", tiny, torch.float32, (3,))
        else:
            for dtype in (torch.float32, torch.float64):
                lines += corpus("bundled", BUNDLED, dtype)
                lines += corpus("tiny", tiny, dtype)
    text = "\n".join(lines) + "\n"
    sys.stdout.write(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
