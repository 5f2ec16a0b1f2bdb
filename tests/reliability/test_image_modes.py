"""Source images of every PIL mode become the right 8-bit RGB picture (tasks.images.to_rgb)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageCms

from tasks.images import UnsupportedImage, check_shape, to_rgb

GREY = np.tile(np.linspace(0, 255, 32).round().astype(np.uint8), (8, 1))  # (8, 32) ramp


def _roundtrip(image: Image.Image, fmt: str, **kw) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return Image.open(io.BytesIO(buf.getvalue()))


@pytest.mark.parametrize(
    "make",
    [
        lambda: _roundtrip(
            Image.fromarray(GREY.astype(np.uint16) * 257), "PNG"
        ),  # 16-bit PNG -> I;16 / I
        lambda: _roundtrip(Image.fromarray(GREY.astype(np.uint16) * 257), "TIFF"),
        lambda: Image.fromarray(GREY.astype(np.int32) * 257, "I"),
        lambda: Image.fromarray(GREY.astype(np.float32) / 255.0, "F"),
        lambda: Image.fromarray(GREY.astype(np.float32), "F"),
        lambda: Image.fromarray(GREY, "L"),
    ],
    ids=["png16", "tiff16", "I", "F-unit", "F-255", "L"],
)
def test_greyscale_modes_scale_not_clip(make):
    rgb = np.asarray(to_rgb(make()))
    assert rgb.shape == (8, 32, 3)
    assert np.abs(rgb[..., 0].astype(int) - GREY).max() <= 1


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 10, 20))  # white band on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    shown = to_rgb(_roundtrip(img, "JPEG", exif=exif.tobytes(), quality=95))
    assert shown.size == (20, 40)
    arr = np.asarray(shown).astype(int)
    assert arr[:10].mean() > 200 and arr[-10:].mean() < 50  # the band is on top once upright


def test_transparency_is_composited_over_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    assert np.asarray(to_rgb(rgba)).min() == 255
    la = Image.new("LA", (4, 4), (0, 0))
    assert np.asarray(to_rgb(la)).min() == 255
    p = Image.new("P", (4, 4), 0)
    p.putpalette([0, 0, 0] * 256)
    p.info["transparency"] = 0
    assert np.asarray(to_rgb(_roundtrip(p, "PNG"))).min() == 255


def test_cmyk_uses_its_profile():
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # red in plain conversion
    plain = np.asarray(to_rgb(cmyk))
    assert tuple(plain[0, 0]) == (255, 0, 0)
    # an embedded profile that is not a CMYK profile cannot be used: converted without it, warned
    cmyk.info["icc_profile"] = profile.tobytes()
    assert np.asarray(to_rgb(cmyk)).shape == (4, 4, 3)


@pytest.mark.parametrize(
    "image, match",
    [
        (Image.fromarray(np.full((4, 4), 300.0, np.float32), "F"), "0..1 or 0..255"),
        (Image.fromarray(np.full((4, 4), np.inf, np.float32), "F"), "NaN or infinite"),
        (Image.fromarray(np.full((4, 4), 70000, np.int32), "I"), "0..65535"),
    ],
)
def test_out_of_range_pixels_are_refused(image, match):
    with pytest.raises(UnsupportedImage, match=match):
        to_rgb(image)


def test_aspect_ratio_bound():
    check_shape(800, 100)
    with pytest.raises(UnsupportedImage, match="1x20000 px"):
        check_shape(1, 20000)
