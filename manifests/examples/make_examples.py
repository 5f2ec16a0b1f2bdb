"""Generate the example manifests and their source images from the reference model's shapes domain.

    python -m manifests.examples.make_examples                       # rewrite the checked-in examples
    python -m manifests.examples.make_examples --out /tmp/ex --image-root s3://bucket/images

Writes ``images/scene-{i}.png`` and:
- ``demo.parquet``: 9 edits over 3 source images (colour, shape and background swaps, each with
  the method recommended for it; one with custom settings), with a ``sku`` passthrough column;
- ``catalog.csv``: the 3 images with captions and skus, for ``editflow restyle``;
- ``bad.parquet``: a manifest with one problem of each common kind, for ``editflow validate``.
``image_uri``s are ``{image_root}/scene-{i}.png``; the checked-in files use the repo-relative
root ``manifests/examples/images`` (run editflow from the repository root).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

logger = logging.getLogger(__name__)

EXAMPLES_DIR = Path(__file__).resolve().parent
CHECKED_IN_IMAGE_ROOT = "manifests/examples/images"  # relative to the repository root
NUM_IMAGES = 3
SEED = 0  # scene sampling seed: the checked-in examples come from it


def _scenes(seed: int) -> list:
    """NUM_IMAGES scenes with distinct shapes (so every edit in the demo changes something visible)."""
    from refmodel import domain

    rng = np.random.default_rng(seed)
    scenes: list = []
    while len(scenes) < NUM_IMAGES:
        scene = domain.sample_scene(rng)
        if scene.shape not in {s.shape for s in scenes}:
            scenes.append(scene)
    return scenes


def _next(options: tuple[str, ...] | list[str], current: str) -> str:
    """The option after `current` (cyclic): a deterministic 'different value'."""
    options = list(options)
    return options[(options.index(current) + 1) % len(options)]


# The method the README recommends for each kind of edit (by the reference model's evaluation):
# Plug-and-Play keeps the structure of recolours and new backgrounds; a shape swap needs
# Prompt-to-Prompt's word swap (PnP's injected features keep the old silhouette).
RECOMMENDED_METHOD = {"colour": "pnp", "shape": "p2p", "background": "pnp"}


def demo_table(scenes: list, image_uris: list[str]) -> pa.Table:
    """Three targets per image: recolour, reshape, new background, each with its recommended method."""
    from refmodel import domain

    rows: dict[str, list] = {
        k: [] for k in ("image_uri", "source_prompt", "target_prompt", "method", "settings", "sku")
    }
    for i, (scene, uri) in enumerate(zip(scenes, image_uris, strict=True)):
        source = domain.caption(scene)
        targets = [
            (
                "colour",
                dataclasses.replace(scene, colour=_next(tuple(domain.COLOURS), scene.colour)),
            ),
            ("shape", dataclasses.replace(scene, shape=_next(domain.SHAPES, scene.shape))),
            (
                "background",
                dataclasses.replace(
                    scene, background=_next(tuple(domain.BACKGROUNDS), scene.background)
                ),
            ),
        ]
        for kind, target in targets:
            rows["image_uri"].append(uri)
            rows["source_prompt"].append(source)
            rows["target_prompt"].append(domain.caption(target))
            rows["method"].append(RECOMMENDED_METHOD[kind])
            rows["settings"].append('{"kind": "replace"}' if (i, kind) == (0, "shape") else None)
            rows["sku"].append(f"SKU-{i:03d}-{kind}")
    return pa.table(rows)


def catalog_table(scenes: list, image_uris: list[str]) -> pa.Table:
    """Image URI + caption + sku: the input of ``editflow restyle``."""
    from refmodel import domain

    return pa.table(
        {
            "image_uri": image_uris,
            "caption": [domain.caption(s) for s in scenes],
            "sku": [f"SKU-{i:03d}" for i in range(len(scenes))],
        }
    )


def bad_table(image_uris: list[str]) -> pa.Table:
    """One row per common mistake (see ``editflow validate manifests/examples/bad.parquet``)."""
    uri = image_uris[0]
    rows = [
        # (image_uri, source_prompt, target_prompt, edit_id, method, num_steps, guidance_scale, settings)
        (uri, "a red circle", "a blue circle", "ok-1", "pnp", 50, 7.5, None),  # fine
        (
            "http://example.com/a.png",
            "a red circle",
            "a blue circle",
            "bad-uri",
            "pnp",
            50,
            7.5,
            None,
        ),
        (uri, None, "a blue circle", "no-source", "pnp", 50, 7.5, None),
        (uri, "a red circle", "", "empty-target", "pnp", 50, 7.5, None),
        (uri, "a red circle", "a blue circle", "bad-method", "sdedit", 50, 7.5, None),
        (uri, "a red circle", "a blue circle", "bad-steps", "pnp", 0, 7.5, None),
        (uri, "a red circle", "a blue circle", "bad-guidance", "pnp", 50, 100.0, None),
        (uri, "a red circle", "a blue circle", "bad-json", "pnp", 50, 7.5, "{feature_t: 0.5"),
        (uri, "a red circle", "a blue circle", "bad-setting", "pnp", 50, 7.5, '{"feature_t": 1.5}'),
        (uri, "a red circle", "a blue circle", "../escape", "pnp", 50, 7.5, None),
        (uri, "a red circle", "a green circle", "ok-1", "pnp", 50, 7.5, None),  # duplicate edit_id
    ]
    names = [
        "image_uri",
        "source_prompt",
        "target_prompt",
        "edit_id",
        "method",
        "num_steps",
        "guidance_scale",
        "settings",
    ]
    return pa.table({name: [r[i] for r in rows] for i, name in enumerate(names)})


def make_examples(
    out_dir: str | Path = EXAMPLES_DIR, *, image_root: str | None = None, seed: int = SEED
) -> dict[str, Path]:
    """Write the example images and manifests into `out_dir`; returns the written paths by name.

    ``image_root`` is the URI prefix the manifests use for the images (default: the absolute
    path of ``out_dir/images``).
    """
    from refmodel import domain

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    root = (image_root or str((out / "images").resolve())).rstrip("/")
    scenes = _scenes(seed)
    uris = []
    written: dict[str, Path] = {}
    for i, scene in enumerate(scenes):
        image, _mask = domain.render(scene)
        path = out / "images" / f"scene-{i}.png"
        image.save(path, format="PNG")
        written[path.stem] = path
        uris.append(f"{root}/scene-{i}.png")
    for name, table in (("demo", demo_table(scenes, uris)), ("bad", bad_table(uris))):
        path = out / f"{name}.parquet"
        pq.write_table(table, path)
        written[name] = path
    path = out / "catalog.csv"
    pacsv.write_csv(catalog_table(scenes, uris), path)
    written["catalog"] = path
    logger.info("wrote %d example files to %s", len(written), out)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        default=str(EXAMPLES_DIR),
        help="folder to write into (default: the checked-in examples)",
    )
    parser.add_argument(
        "--image-root", default=None, help="URI prefix of the images in the manifests"
    )
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    image_root = args.image_root
    if image_root is None and Path(args.out).resolve() == EXAMPLES_DIR:
        image_root = CHECKED_IN_IMAGE_ROOT
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name, path in make_examples(args.out, image_root=image_root, seed=args.seed).items():
        logger.info("  %s: %s", name, path)


if __name__ == "__main__":
    main()
