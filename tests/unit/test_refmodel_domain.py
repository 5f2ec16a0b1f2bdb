"""Tests for the procedural shapes domain: rendering, captions and the pixel scorers."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from refmodel.domain import (
    BACKGROUNDS,
    COLOURS,
    IMAGE_SIZE,
    MAX_SIZE,
    MIN_SIZE,
    SEGMENT_THRESHOLD,
    SHAPES,
    Scene,
    caption,
    caption_words,
    classify_background,
    classify_colour,
    classify_shape,
    mask_iou,
    psnr,
    render,
    render_array,
    sample_scene,
    segment,
)


def _scenes(n: int, seed: int = 0) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [sample_scene(rng) for _ in range(n)]


def test_sampling_is_deterministic_with_seed() -> None:
    assert _scenes(20, seed=3) == _scenes(20, seed=3)
    assert _scenes(20, seed=3) != _scenes(20, seed=4)


def test_render_shapes_and_mask_consistency() -> None:
    for scene in _scenes(50):
        image, mask = render(scene)
        arr = np.asarray(image)
        assert image.mode == "RGB" and image.size == (IMAGE_SIZE, IMAGE_SIZE)
        assert mask.dtype == bool and mask.shape == (IMAGE_SIZE, IMAGE_SIZE)
        assert (arr[mask] == COLOURS[scene.colour]).all()
        assert (arr[~mask] == BACKGROUNDS[scene.background]).all()
        # object fully inside, border ring is pure background
        assert not mask[0].any() and not mask[-1].any()
        assert not mask[:, 0].any() and not mask[:, -1].any()
        area = mask.sum()
        assert area >= 0.4 * MIN_SIZE**2 and area <= MAX_SIZE**2 + 4 * MAX_SIZE


def test_render_is_deterministic() -> None:
    scene = _scenes(1)[0]
    a, ma = render_array(scene)
    b, mb = render_array(scene)
    assert (a == b).all() and (ma == mb).all()


def test_palette_is_separable() -> None:
    for (_, c), (_, b) in itertools.product(COLOURS.items(), BACKGROUNDS.items()):
        assert np.linalg.norm(np.subtract(c, b)) > 2 * SEGMENT_THRESHOLD
    for (n1, c1), (n2, c2) in itertools.combinations(COLOURS.items(), 2):
        assert np.linalg.norm(np.subtract(c1, c2)) > 100, (n1, n2)


@pytest.mark.parametrize(
    ("shape", "colour", "background"),
    list(itertools.product(SHAPES, COLOURS, BACKGROUNDS)),
)
def test_scorers_recover_ground_truth(shape: str, colour: str, background: str) -> None:
    rng = np.random.default_rng(hash((shape, colour, background)) % 2**32)
    for _ in range(4):
        size = float(rng.uniform(MIN_SIZE, MAX_SIZE))
        lo, hi = 1 + size / 2, IMAGE_SIZE - 1 - size / 2
        scene = Scene(shape, colour, background, rng.uniform(lo, hi), rng.uniform(lo, hi), size)
        image, mask = render(scene)
        seg = segment(image)
        assert mask_iou(seg, mask) == 1.0
        assert classify_background(image) == background
        assert classify_colour(image, seg) == colour
        assert classify_shape(seg) == shape


def test_shape_classifier_on_many_random_scenes() -> None:
    scenes = _scenes(600, seed=11)
    correct = sum(classify_shape(render_array(s)[1]) == s.shape for s in scenes)
    assert correct / len(scenes) >= 0.995


def test_captions() -> None:
    scene = Scene("circle", "red", "gray", 16.0, 16.0, 12.0)
    assert caption(scene) == "a red circle on a gray background"
    assert caption(scene, {"colour"}) == "a circle on a gray background"
    assert caption(scene, {"background"}) == "a red circle"
    assert caption(scene, {"colour", "background"}) == "a circle"
    with pytest.raises(ValueError, match="shape"):
        caption(scene, {"shape"})
    words = set(caption_words())
    for s in _scenes(50):
        assert set(caption(s).split()) <= words


def test_scene_validation() -> None:
    with pytest.raises(ValueError, match="hexagon"):
        Scene("hexagon", "red", "gray", 16.0, 16.0, 12.0)
    with pytest.raises(ValueError, match="fit"):
        Scene("circle", "red", "gray", 2.0, 16.0, 12.0)


def test_empty_and_noisy_inputs() -> None:
    flat = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), 128, np.uint8)
    empty = segment(flat)
    assert not empty.any()
    assert classify_colour(flat, empty) is None
    assert classify_shape(empty) is None
    # a stray pixel is dropped by the largest-component filter
    scene = Scene("square", "blue", "white", 16.0, 16.0, 14.0)
    arr, mask = render_array(scene)
    arr = arr.copy()
    arr[2, 2] = (0, 0, 0)
    assert mask_iou(segment(arr), mask) == 1.0


def test_iou_and_psnr() -> None:
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[:2] = True
    b[1:3] = True
    assert mask_iou(a, b) == pytest.approx(1 / 3)
    assert mask_iou(np.zeros((2, 2), bool), np.zeros((2, 2), bool)) == 1.0
    x = np.zeros((8, 8, 3), np.uint8)
    y = x.copy()
    assert psnr(x, y) == float("inf")
    y[0, 0] = 255
    region = np.zeros((8, 8), bool)
    region[4:] = True
    assert psnr(x, y, region_mask=region) == float("inf")
    expected = 10 * np.log10(255.0**2 / (255.0**2 * 3 / (64 * 3)))
    assert psnr(x, y) == pytest.approx(expected)


# ----------------------------------------------------------------------------- styles


def test_styled_sampling_draws_every_style_and_plain_sampling_is_unchanged() -> None:
    from refmodel.domain import STYLES, TRAIN_STYLE_PROBS

    rng = np.random.default_rng(1)
    styles = {sample_scene(rng, TRAIN_STYLE_PROBS).style for _ in range(200)}
    assert styles == set(STYLES)
    assert all(s.style == "plain" for s in _scenes(50))
    with pytest.raises(ValueError, match="style_probs"):
        sample_scene(rng, (1.0,))
    with pytest.raises(ValueError, match="unknown style"):
        Scene("circle", "red", "gray", 16.0, 16.0, 12.0, "wavy")


def test_styled_captions_end_with_the_style_and_fit_the_vocabulary() -> None:
    scene = Scene("circle", "red", "gray", 16.0, 16.0, 12.0, "striped")
    assert caption(scene) == "a red circle on a gray background, striped"
    assert caption(scene, {"colour", "background"}) == "a circle, striped"
    assert {",", "outlined", "striped", "dotted"} <= set(caption_words())


def test_styles_keep_the_silhouette_and_draw_their_pattern() -> None:
    from refmodel.domain import dark_shade, style_pattern

    base = Scene("square", "blue", "white", 16.0, 16.0, 16.0)
    plain, mask = render_array(base)
    for style in ("outlined", "striped", "dotted"):
        image, styled_mask = render_array(Scene(**{**base.__dict__, "style": style}))
        assert (styled_mask == mask).all()
        assert (image[~mask] == BACKGROUNDS["white"]).all()
        if style == "outlined":
            inside = mask.copy()
            inside[mask] = (image[mask] == BACKGROUNDS["white"]).all(axis=1)
            assert inside.sum() > 0.3 * mask.sum()  # the background shows inside the ring
        else:
            dark = (image == dark_shade("blue")).all(axis=2)
            assert (dark == (mask & style_pattern(style))).all()


def test_scorers_recover_style_shape_and_colour_of_every_styled_render() -> None:
    from refmodel.domain import TRAIN_STYLE_PROBS, classify_style

    rng = np.random.default_rng(5)
    for _ in range(600):
        scene = sample_scene(rng, TRAIN_STYLE_PROBS)
        image, mask = render_array(scene)
        found = segment(image)
        assert mask_iou(found, mask) == 1.0, scene
        assert classify_shape(found) == scene.shape, scene
        assert classify_colour(image, found) == scene.colour, scene
        assert classify_style(image, found) == scene.style, scene
        assert classify_background(image) == scene.background, scene
