"""The shapes reference model: a small Stable-Diffusion-shaped model trained from scratch.

`refmodel.domain` renders and scores the procedural scenes, `refmodel.tokenizer` builds the
CLIP tokenizer of caption words, `refmodel.train` trains, exports and probes the model.
`REFERENCE_MODEL_DIR` is the bundled exported pipeline (load it with
`StableDiffusionPipeline.from_pretrained(REFERENCE_MODEL_DIR)`).
"""

from __future__ import annotations

from pathlib import Path

REFERENCE_MODEL_DIR = Path(__file__).parent / "shapes-v2"

__all__ = ["REFERENCE_MODEL_DIR"]
