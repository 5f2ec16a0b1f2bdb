"""Hash the decoded pixels of every image a run wrote, so that two runs of the demo can be compared after
a refactor whatever metadata the PNGs or sidecars carry (the PNG text chunks hold the model's path and
versions; sidecars gain fields over time).

    python -m benchmarks.demo_pixels OUT > pixels.sha     # then diff two such files
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

from PIL import Image


def pixel_hashes(out: Path) -> list[str]:
    lines = []
    for path in sorted((out / "assets").glob("*")):
        if path.suffix == ".json":
            continue
        with Image.open(path) as image:
            digest = hashlib.sha256(
                f"{image.mode} {image.size}".encode() + image.tobytes()
            ).hexdigest()
        lines.append(f"{digest}  assets/{path.name}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="a run's --out folder (local storage)")
    lines = pixel_hashes(parser.parse_args(argv).out)
    print("\n".join(lines))
    return 0 if lines else 1


if __name__ == "__main__":
    raise SystemExit(main())
