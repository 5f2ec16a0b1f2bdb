"""Decoding source images for editing: any PIL mode to 8-bit RGB, done right, and size limits.

``Image.convert("RGB")`` clips 16-bit and 32-bit greyscale to white, ignores CMYK colour profiles,
EXIF orientation and transparency; :func:`to_rgb` handles each (see its docstring). The limits
bound what a row may cost: an extreme aspect ratio would give a huge output at the model's size rule.
"""

from __future__ import annotations

import io
import logging

import numpy as np
from PIL import Image, ImageCms, ImageOps

__all__ = ["MAX_ASPECT_RATIO", "UnsupportedImage", "to_rgb", "check_shape"]

logger = logging.getLogger(__name__)

MAX_ASPECT_RATIO = (
    8.0  # longer side / shorter side; SD's size rule keeps >= 181 px on the short side at 8:1
)
BACKGROUND = (
    255,
    255,
    255,
)  # transparent pixels are composited over white (product-photo convention)


class UnsupportedImage(ValueError):
    """An image that decodes but cannot be edited as it is (pixel range, shape); the message says why."""


def _scale_to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    """Integer (16-bit range) or float ([0, 1] or [0, 255]) greyscale pixels to uint8, scaled not clipped."""
    if mode == "F":
        if not np.isfinite(arr).all():
            raise UnsupportedImage("floating-point image has NaN or infinite pixels")
        lo, hi = float(arr.min()), float(arr.max())
        if lo >= 0.0 and hi <= 1.0:
            return np.round(arr * 255.0).astype(np.uint8)
        if lo >= 0.0 and hi <= 255.0:
            return np.round(arr).astype(np.uint8)
        raise UnsupportedImage(
            f"floating-point pixels span {lo:g}..{hi:g}; expected 0..1 or 0..255"
        )
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi > 65535:
        raise UnsupportedImage(f"integer pixels span {lo}..{hi}; expected 16-bit values 0..65535")
    return np.round(arr.astype(np.float64) / 257.0).astype(np.uint8)


def _cmyk_to_rgb(image: Image.Image) -> Image.Image:
    icc = image.info.get("icc_profile")
    if icc:
        try:
            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            return ImageCms.profileToProfile(
                image, src, ImageCms.createProfile("sRGB"), outputMode="RGB"
            )
        except (ImageCms.PyCMSError, OSError, ValueError) as exc:
            logger.warning(
                "CMYK image's colour profile is unusable (%s); converting without it", exc
            )
    return image.convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` as 8-bit RGB, upright and opaque.

    - EXIF orientation is applied (the picture as viewers show it);
    - 16-bit and 32-bit integer greyscale (I;16*, I) are scaled from 0..65535 (Pillow opens 16-bit
      PNG/TIFF this way); values outside that range are refused;
    - float greyscale (F) in 0..1 or 0..255 is scaled accordingly, else refused;
    - CMYK is converted through its embedded ICC profile to sRGB (plain conversion without one);
    - alpha (RGBA, LA, PA, P with transparency) is composited over white;
    - other modes (1, L, P, YCbCr, LAB, HSV) convert as Pillow does.
    """
    image = ImageOps.exif_transpose(image) or image
    mode = image.mode
    if mode.startswith("I") or mode == "F":
        arr = np.asarray(image)
        grey = _scale_to_uint8(
            arr.astype(np.float64) if mode == "F" else arr.astype(np.int64), mode
        )
        return Image.fromarray(grey, "L").convert("RGB")
    if mode == "CMYK":
        return _cmyk_to_rgb(image)
    if mode == "P" and "transparency" in image.info or mode == "PA":
        image = image.convert("RGBA")
    elif mode in ("LA", "La"):
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "RGBa"):
        background = Image.new("RGBA", image.size, BACKGROUND + (255,))
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def check_shape(width: int, height: int, *, max_aspect: float = MAX_ASPECT_RATIO) -> None:
    """``UnsupportedImage`` for an image thinner than 1:`max_aspect` (its output would be huge or degenerate)."""
    if width < 1 or height < 1:
        raise UnsupportedImage(f"image is {width}x{height} px")
    ratio = max(width, height) / min(width, height)
    if ratio > max_aspect:
        raise UnsupportedImage(
            f"image is {width}x{height} px, aspect ratio {ratio:.0f}:1; editflow edits images up to "
            f"{max_aspect:g}:1 (crop or pad it first)"
        )
