"""Procedural "shapes" domain for the reference model: seeded scenes, renderer, captions, scorers.

One flat-coloured object (circle, square or triangle) on a flat background, 32x32 RGB, with the
ground-truth mask. The scorers recover background, colour and shape from pixels alone, so the
evaluation can check prompt following and edits without a learned classifier.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
from PIL import Image

IMAGE_SIZE = 32  # px; the model's native resolution (VAE latent is 16x16x4)
SUPERSAMPLE = 4  # shapes are rasterised at 4x and a pixel is "object" when >= half covered
MIN_SIZE = 10  # px; object extent (circle diameter, square side, triangle base and height)
MAX_SIZE = 20  # px
MARGIN = 1  # px kept free between the object and the image border

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

# Object colours (RGB 0..255). "turquoise" is tokenised into two sub-tokens on purpose.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "purple": (150, 40, 200),
    "turquoise": (40, 210, 200),
}

# Flat backgrounds (RGB 0..255), far from every object colour.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "gray": (128, 128, 128),
    "black": (0, 0, 0),
    "white": (255, 255, 255),
}

# Pixels farther than this (Euclidean RGB, 0..255 scale) from the background are "object".
# The closest object/background pair (purple on gray) is ~116 apart.
SEGMENT_THRESHOLD = 50.0

CAPTION_DROPS: tuple[frozenset[str], ...] = (
    frozenset(),
    frozenset({"colour"}),
    frozenset({"background"}),
    frozenset({"colour", "background"}),
)


@dataclass(frozen=True)
class Scene:
    """One object on a flat background; geometry in pixels of the 32x32 image."""

    shape: str  # one of SHAPES
    colour: str  # key of COLOURS
    background: str  # key of BACKGROUNDS
    cx: float  # px, object centre x (column), continuous
    cy: float  # px, object centre y (row), continuous
    size: float  # px, object extent, MIN_SIZE..MAX_SIZE

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; expected one of {SHAPES}")
        if self.colour not in COLOURS:
            raise ValueError(f"unknown colour {self.colour!r}; expected one of {tuple(COLOURS)}")
        if self.background not in BACKGROUNDS:
            raise ValueError(
                f"unknown background {self.background!r}; expected one of {tuple(BACKGROUNDS)}"
            )
        half = self.size / 2
        lo, hi = MARGIN + half, IMAGE_SIZE - MARGIN - half
        if not (lo - 1e-6 <= self.cx <= hi + 1e-6 and lo - 1e-6 <= self.cy <= hi + 1e-6):
            raise ValueError(f"object does not fit in the image: {self}")


def sample_scene(rng: np.random.Generator) -> Scene:
    """Draw a uniformly random scene (shape, colour, background, position, size)."""
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    colour = tuple(COLOURS)[int(rng.integers(len(COLOURS)))]
    background = tuple(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    size = float(rng.uniform(MIN_SIZE, MAX_SIZE))
    half = size / 2
    lo, hi = MARGIN + half, IMAGE_SIZE - MARGIN - half
    cx = float(rng.uniform(lo, hi))
    cy = float(rng.uniform(lo, hi))
    return Scene(shape, colour, background, cx, cy, size)


def _coverage(
    shape: str, cx: float, cy: float, size: float, image_size: int = IMAGE_SIZE
) -> np.ndarray:
    """Fraction of each pixel covered by a shape, from SUPERSAMPLE^2 samples. (H, W) float."""
    n = image_size * SUPERSAMPLE
    coords = (np.arange(n, dtype=np.float64) + 0.5) / SUPERSAMPLE  # sample centres in px
    x = coords[None, :]
    y = coords[:, None]
    half = size / 2
    if shape == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= half**2
    elif shape == "square":
        inside = (np.abs(x - cx) <= half) & (np.abs(y - cy) <= half)
    else:  # triangle: apex up, base = height = size
        rel = (y - (cy - half)) / size  # 0 at apex, 1 at base
        inside = (rel >= 0) & (rel <= 1) & (np.abs(x - cx) <= rel * half)
    inside = np.broadcast_to(inside, (n, n)).astype(np.float32)
    return inside.reshape(image_size, SUPERSAMPLE, image_size, SUPERSAMPLE).mean(axis=(1, 3))


def render_array(scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """Render to (uint8 (H, W, 3) image, bool (H, W) mask), hard edges."""
    mask = _coverage(scene.shape, scene.cx, scene.cy, scene.size) >= 0.5
    image = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    image[:] = BACKGROUNDS[scene.background]
    image[mask] = COLOURS[scene.colour]
    return image, mask


def render(scene: Scene) -> tuple[Image.Image, np.ndarray]:
    """Render to (PIL RGB image, bool (H, W) object mask)."""
    image, mask = render_array(scene)
    return Image.fromarray(image, mode="RGB"), mask


def caption(scene: Scene, drop: frozenset[str] | set[str] = frozenset()) -> str:
    """Caption, optionally without the colour and/or background: "a red circle on a gray background"."""
    unknown = set(drop) - {"colour", "background"}
    if unknown:
        raise ValueError(f"can only drop 'colour' and 'background', got {sorted(unknown)}")
    words = ["a"]
    if "colour" not in drop:
        words.append(scene.colour)
    words.append(scene.shape)
    if "background" not in drop:
        words += ["on", "a", scene.background, "background"]
    return " ".join(words)


def caption_words() -> list[str]:
    """Every word any caption can contain (the tokenizer's vocabulary of words)."""
    words = ["a", "on", "background", *SHAPES, *COLOURS, *BACKGROUNDS]
    return list(dict.fromkeys(words))


# ----------------------------------------------------------------------------- scorers


def _as_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """RGB image as float (H, W, 3) array in 0..255."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    arr = np.asarray(image, dtype=np.float64)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {arr.shape}")
    return arr


def _border_pixels(arr: np.ndarray) -> np.ndarray:
    """The outermost ring of pixels, (N, 3)."""
    return np.concatenate([arr[0], arr[-1], arr[1:-1, 0], arr[1:-1, -1]], axis=0)


def estimate_background(image: Image.Image | np.ndarray) -> np.ndarray:
    """Background colour as the per-channel median of the border pixels, float (3,)."""
    return np.median(_border_pixels(_as_array(image)), axis=0)


def _nearest(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    names = list(palette)
    ref = np.asarray([palette[n] for n in names], dtype=np.float64)
    return names[int(np.argmin(((ref - rgb[None]) ** 2).sum(axis=1)))]


def classify_background(image: Image.Image | np.ndarray) -> str:
    """Name of the nearest BACKGROUNDS colour to the estimated background."""
    return _nearest(estimate_background(image), BACKGROUNDS)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """Largest 4-connected component of a bool mask (empty mask stays empty)."""
    h, w = mask.shape
    labels = np.zeros((h, w), dtype=np.int32)
    best_label, best_size, current = 0, 0, 0
    for sy, sx in zip(*np.nonzero(mask), strict=True):
        if labels[sy, sx]:
            continue
        current += 1
        labels[sy, sx] = current
        queue, size = deque([(sy, sx)]), 0
        while queue:
            y, x = queue.popleft()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = current
                    queue.append((ny, nx))
        if size > best_size:
            best_label, best_size = current, size
    return labels == best_label if best_size else np.zeros_like(mask, dtype=bool)


def segment(
    image: Image.Image | np.ndarray,
    background_rgb: tuple[float, float, float] | np.ndarray | None = None,
    threshold: float = SEGMENT_THRESHOLD,
    largest_component: bool = True,
) -> np.ndarray:
    """Object mask: pixels farther than `threshold` from the background colour, bool (H, W).

    The background colour defaults to the median of the border pixels. With
    `largest_component`, stray pixels (e.g. in generated images) are dropped.
    """
    arr = _as_array(image)
    bg = estimate_background(arr) if background_rgb is None else np.asarray(background_rgb, float)
    mask = np.sqrt(((arr - bg[None, None]) ** 2).sum(axis=2)) > threshold
    return _largest_component(mask) if largest_component else mask


def classify_colour(image: Image.Image | np.ndarray, mask: np.ndarray | None = None) -> str | None:
    """Nearest COLOURS entry to the median colour of the object pixels (None if no object)."""
    arr = _as_array(image)
    if mask is None:
        mask = segment(arr)
    if not mask.any():
        return None
    return _nearest(np.median(arr[mask], axis=0), COLOURS)


def fill_ratio(mask: np.ndarray) -> float:
    """Fraction of the mask's bounding box covered by the mask (0 for an empty mask)."""
    if not mask.any():
        return 0.0
    rows = np.nonzero(mask.any(axis=1))[0]
    cols = np.nonzero(mask.any(axis=0))[0]
    box = (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)
    return float(mask.sum() / box)


def classify_shape(mask: np.ndarray) -> str | None:
    """Shape whose ideal rendering in the mask's bounding box overlaps the mask best (IoU).

    Equivalent in spirit to the bounding-box fill ratio (square ~1.0, circle ~0.785,
    triangle ~0.5) but robust to pixelation of small objects. None for an empty mask.
    """
    mask = np.asarray(mask, bool)
    if not mask.any():
        return None
    if mask.shape[0] != mask.shape[1]:
        raise ValueError(f"expected a square mask, got shape {mask.shape}")
    rows = np.nonzero(mask.any(axis=1))[0]
    cols = np.nonzero(mask.any(axis=0))[0]
    cy = (rows[0] + rows[-1] + 1) / 2
    cx = (cols[0] + cols[-1] + 1) / 2
    size = ((rows[-1] - rows[0] + 1) + (cols[-1] - cols[0] + 1)) / 2
    scores = {
        shape: mask_iou(mask, _coverage(shape, cx, cy, size, mask.shape[0]) >= 0.5)
        for shape in SHAPES
    }
    return max(scores, key=scores.__getitem__)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two bool masks (1.0 when both are empty)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if a.shape != b.shape:
        raise ValueError(f"mask shapes differ: {a.shape} vs {b.shape}")
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def psnr(
    a: Image.Image | np.ndarray,
    b: Image.Image | np.ndarray,
    region_mask: np.ndarray | None = None,
) -> float:
    """PSNR in dB between two RGB images on the 0..255 scale, optionally only inside a mask."""
    x, y = _as_array(a), _as_array(b)
    if x.shape != y.shape:
        raise ValueError(f"image shapes differ: {x.shape} vs {y.shape}")
    diff = (x - y) ** 2
    if region_mask is not None:
        region_mask = np.asarray(region_mask, bool)
        if not region_mask.any():
            raise ValueError("region_mask is empty")
        diff = diff[region_mask]
    mse = float(diff.mean())
    return float("inf") if mse == 0 else 10.0 * float(np.log10(255.0**2 / mse))
