"""Fixtures for the engine tests: a tiny SD-shaped model (random weights, built from configs) and images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from editing.inversion import invert
from editing.model import load_model
from refmodel.toy import TINY, build_toy_pipeline

STEPS = 10  # enough steps to exercise every schedule boundary, few enough for a fast suite


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return build_toy_pipeline(tmp_path_factory.mktemp("tiny-sd"), TINY, seed=0)


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    """The tiny model in float64: a random-weight UNet under guidance 7.5 is chaotic (fp32 rounding grows
    ~1.3x per step), so the invariants are checked in fp64 where rounding cannot hide a logic error."""
    return load_model(tiny_dir, dtype=torch.float64)


@pytest.fixture(scope="session")
def tiny32(tiny_dir):
    return load_model(tiny_dir)


def make_image(seed: int, size: int = 16) -> Image.Image:
    """A smooth random image (random weights make any content equally fine)."""
    rng = np.random.default_rng(seed)
    small = rng.uniform(0, 255, size=(4, 4, 3)).astype(np.uint8)
    return Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC)


@pytest.fixture(scope="session")
def cat_inversion(tiny):
    return invert(tiny, make_image(0), "a photo of a cat", num_steps=STEPS)


@pytest.fixture(scope="session")
def dog_inversion(tiny):
    return invert(tiny, make_image(1), "a photo of a dog on gray background", num_steps=STEPS)
