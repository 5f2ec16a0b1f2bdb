"""Procedural "shapes" domain for the reference model: seeded scenes, renderer, captions, scorers.

One coloured object (circle, square or triangle) on a flat background, 32x32 RGB, with the
ground-truth mask, drawn plain or in one of a few procedural styles (outlined, striped, dotted),
so that catalog restyling can be tried and scored on the bundled model. The scorers recover
background, colour, shape and style from pixels alone, so the evaluation can check prompt
following and edits without a learned classifier.
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

# Procedural styles: a deterministic rendering of the same object (same mask, same colour).
# "plain" has no caption word; the others are appended to the caption: "..., striped".
# The patterns use a darker shade of the object colour (DARK_SHADE x RGB), which stays far from
# every background (>= 89 RGB units), so segmentation still finds the whole object.
STYLES: tuple[str, ...] = ("plain", "outlined", "striped", "dotted")
DARK_SHADE = 0.5  # striped / dotted pattern colour = this x the object colour
OUTLINE_WIDTH = 2  # px; "outlined" keeps this ring of the object and shows the background inside
STRIPE_PERIOD = 4  # px; "striped": rows with (y // (period/2)) odd are dark (horizontal stripes)
DOT_PERIOD = 4  # px; "dotted": 2x2 dark dots on a 4 px grid
# Sampling probabilities of the styles in training scenes (plain captions stay the majority).
TRAIN_STYLE_PROBS: tuple[float, ...] = (0.58, 0.14, 0.14, 0.14)

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
    style: str = "plain"  # one of STYLES

    def __post_init__(self) -> None:
        if self.style not in STYLES:
            raise ValueError(f"unknown style {self.style!r}; expected one of {STYLES}")
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


def sample_scene(rng: np.random.Generator, style_probs: tuple[float, ...] | None = None) -> Scene:
    """Draw a random scene (shape, colour, background, position, size uniform).

    Without `style_probs` the scene is plain and the draws are those of the plain domain (so
    seeded evaluations keep their scenes); with it (one probability per STYLES entry) the style
    is drawn last.
    """
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    colour = tuple(COLOURS)[int(rng.integers(len(COLOURS)))]
    background = tuple(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    size = float(rng.uniform(MIN_SIZE, MAX_SIZE))
    half = size / 2
    lo, hi = MARGIN + half, IMAGE_SIZE - MARGIN - half
    cx = float(rng.uniform(lo, hi))
    cy = float(rng.uniform(lo, hi))
    style = "plain"
    if style_probs is not None:
        if len(style_probs) != len(STYLES) or abs(sum(style_probs) - 1.0) > 1e-6:
            raise ValueError(f"style_probs must be {len(STYLES)} probabilities summing to 1")
        style = STYLES[int(rng.choice(len(STYLES), p=style_probs))]
    return Scene(shape, colour, background, cx, cy, size, style)


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


def _erode(mask: np.ndarray, steps: int = 1) -> np.ndarray:
    """4-neighbour binary erosion, `steps` times (pixels outside the image count as empty)."""
    out = np.asarray(mask, bool)
    for _ in range(steps):
        padded = np.pad(out, 1, constant_values=False)
        out = (
            padded[1:-1, 1:-1]
            & padded[:-2, 1:-1]
            & padded[2:, 1:-1]
            & padded[1:-1, :-2]
            & padded[1:-1, 2:]
        )
    return out


def dark_shade(colour: str) -> np.ndarray:
    """The pattern colour of `colour` in the striped and dotted styles, uint8 (3,)."""
    return np.round(np.asarray(COLOURS[colour], np.float64) * DARK_SHADE).astype(np.uint8)


def style_pattern(style: str, size: int = IMAGE_SIZE) -> np.ndarray:
    """Where a style draws the dark shade, bool (H, W) (all False for plain and outlined)."""
    y, x = np.mgrid[0:size, 0:size]
    if style == "striped":
        return (y // (STRIPE_PERIOD // 2)) % 2 == 1
    if style == "dotted":
        half = DOT_PERIOD // 2
        return ((y % DOT_PERIOD) // half == 1) & ((x % DOT_PERIOD) // half == 1)
    return np.zeros((size, size), dtype=bool)


def render_array(scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """Render to (uint8 (H, W, 3) image, bool (H, W) object mask), hard edges.

    The mask is the object's filled silhouette whatever the style (for "outlined" the inside
    shows the background but belongs to the object).
    """
    mask = _coverage(scene.shape, scene.cx, scene.cy, scene.size) >= 0.5
    image = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    image[:] = BACKGROUNDS[scene.background]
    if scene.style == "outlined":
        image[mask & ~_erode(mask, OUTLINE_WIDTH)] = COLOURS[scene.colour]
    else:
        image[mask] = COLOURS[scene.colour]
        image[mask & style_pattern(scene.style)] = dark_shade(scene.colour)
    return image, mask


def render(scene: Scene) -> tuple[Image.Image, np.ndarray]:
    """Render to (PIL RGB image, bool (H, W) object mask)."""
    image, mask = render_array(scene)
    return Image.fromarray(image, mode="RGB"), mask


def caption(scene: Scene, drop: frozenset[str] | set[str] = frozenset()) -> str:
    """Caption, optionally without the colour and/or background: "a red circle on a gray background".

    A styled scene's caption ends with ", STYLE" (never dropped: a caption without a style word
    means plain): "a red circle on a gray background, striped".
    """
    unknown = set(drop) - {"colour", "background"}
    if unknown:
        raise ValueError(f"can only drop 'colour' and 'background', got {sorted(unknown)}")
    words = ["a"]
    if "colour" not in drop:
        words.append(scene.colour)
    words.append(scene.shape)
    if "background" not in drop:
        words += ["on", "a", scene.background, "background"]
    text = " ".join(words)
    return text if scene.style == "plain" else f"{text}, {scene.style}"


def caption_words() -> list[str]:
    """Every word any caption can contain (the tokenizer's vocabulary of words; "," is a token)."""
    styles = [s for s in STYLES if s != "plain"]
    words = ["a", "on", "background", *SHAPES, *COLOURS, *BACKGROUNDS, ",", *styles]
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


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """The mask with every region not 4-connected to the image border filled, bool (H, W)."""
    mask = np.asarray(mask, bool)
    outside = np.zeros_like(mask)
    h, w = mask.shape
    queue = deque(
        (y, x)
        for y in range(h)
        for x in range(w)
        if (y in (0, h - 1) or x in (0, w - 1)) and not mask[y, x]
    )
    for y, x in queue:
        outside[y, x] = True
    while queue:
        y, x = queue.popleft()
        for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
            if 0 <= ny < h and 0 <= nx < w and not mask[ny, nx] and not outside[ny, nx]:
                outside[ny, nx] = True
                queue.append((ny, nx))
    return ~outside


def _foreground(arr: np.ndarray, bg: np.ndarray, threshold: float) -> np.ndarray:
    """Pixels farther than `threshold` from the background colour, bool (H, W)."""
    return np.sqrt(((arr - bg[None, None]) ** 2).sum(axis=2)) > threshold


def segment(
    image: Image.Image | np.ndarray,
    background_rgb: tuple[float, float, float] | np.ndarray | None = None,
    threshold: float = SEGMENT_THRESHOLD,
    largest_component: bool = True,
    holes: bool = False,
) -> np.ndarray:
    """Object silhouette: pixels farther than `threshold` from the background colour, with
    enclosed holes filled (an outlined object is its whole shape), bool (H, W).

    The background colour defaults to the median of the border pixels. With
    `largest_component`, stray pixels (e.g. in generated images) are dropped. `holes=True`
    keeps the holes (the drawn pixels only).
    """
    arr = _as_array(image)
    bg = estimate_background(arr) if background_rgb is None else np.asarray(background_rgb, float)
    mask = _foreground(arr, bg, threshold)
    if largest_component:
        mask = _largest_component(mask)
    return mask if holes else fill_holes(mask)


def _colour_palette() -> tuple[list[str], np.ndarray]:
    """Each colour and its dark shade, as (base colour name per entry, (2C, 3) RGB)."""
    names = list(COLOURS)
    rgb = [COLOURS[n] for n in names] + [tuple(dark_shade(n)) for n in names]
    return names + names, np.asarray(rgb, dtype=np.float64)


def classify_colour(image: Image.Image | np.ndarray, mask: np.ndarray | None = None) -> str | None:
    """The object's colour: a vote of its drawn pixels, each matched to the nearest colour or
    dark shade (so striped and dotted objects count as their colour; None if no object)."""
    arr = _as_array(image)
    if mask is None:
        mask = segment(arr)
    drawn = np.asarray(mask, bool) & _foreground(arr, estimate_background(arr), SEGMENT_THRESHOLD)
    if not drawn.any():
        return None
    names, ref = _colour_palette()
    pixels = arr[drawn]  # (N, 3)
    nearest = np.argmin(((pixels[:, None, :] - ref[None]) ** 2).sum(axis=2), axis=1)
    votes: dict[str, int] = {}
    for i in nearest:
        votes[names[i]] = votes.get(names[i], 0) + 1
    return max(votes, key=votes.__getitem__)


# Style decision thresholds.
OUTLINE_MIN_BACKGROUND = 0.1  # outlined: at least this share of the silhouette shows the background
PATTERN_MIN_DARK = 0.12  # striped / dotted: at least this share of the inside is the dark shade


def _pattern_agreement(dark: np.ndarray, region: np.ndarray, style: str) -> float:
    """Best agreement (share of `region`) of `dark` with the style's pattern over its phases."""
    period = STRIPE_PERIOD if style == "striped" else DOT_PERIOD
    size = dark.shape[0]
    base = style_pattern(style, size + period)
    best = 0.0
    for dy in range(period):
        for dx in range(period):
            shifted = base[dy : dy + size, dx : dx + size]
            best = max(best, float((shifted == dark)[region].mean()))
    return best


def classify_style(image: Image.Image | np.ndarray, mask: np.ndarray | None = None) -> str | None:
    """Which of STYLES the object is drawn in (None if no object).

    Background showing inside the silhouette -> outlined; else the share of pixels nearer the
    colour's dark shade than the colour decides plain vs patterned, and the pattern (striped or
    dotted, at any phase) that agrees best with where the dark pixels are decides which.
    """
    arr = _as_array(image)
    if mask is None:
        mask = segment(arr)
    mask = np.asarray(mask, bool)
    colour = classify_colour(arr, mask)
    if colour is None:
        return None
    background = ~_foreground(arr, estimate_background(arr), SEGMENT_THRESHOLD)
    if background[mask].mean() >= OUTLINE_MIN_BACKGROUND:
        return "outlined"
    inner = _erode(mask, 1)
    if inner.sum() < 4:
        inner = mask
    base = np.asarray(COLOURS[colour], np.float64)
    dark_rgb = dark_shade(colour).astype(np.float64)
    dark = ((arr - dark_rgb) ** 2).sum(axis=2) < ((arr - base) ** 2).sum(axis=2)
    if dark[inner].mean() < PATTERN_MIN_DARK:
        return "plain"
    striped = _pattern_agreement(dark, inner, "striped")
    dotted = _pattern_agreement(dark, inner, "dotted")
    return "striped" if striped >= dotted else "dotted"


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
