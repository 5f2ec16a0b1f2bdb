"""editflow's diffusion engine: inversion, Prompt-to-Prompt and Plug-and-Play on diffusers.

Pure torch + diffusers + PIL (no Prefect, no boto3), usable from a notebook::

    from editing import load_model, invert, edit, SourceGroup, Target, PnPConfig
    model = load_model("refmodel/shapes-v2")            # or any SD 1.x/2.x folder / hub id
    inv = invert(model, image, "a red circle on a gray background")
    [results] = edit(model, [SourceGroup(inv, [Target("a blue circle on a gray background", PnPConfig())])])
    results[0].image.save("edit.png")

Heavy modules are imported lazily so that ``editing.configs`` stays cheap to import.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "load_model": "editing.model",
    "EditModel": "editing.model",
    "invert": "editing.inversion",
    "Inversion": "editing.inversion",
    "edit": "editing.methods",
    "METHODS": "editing.methods",
    "SourceGroup": "editing.methods",
    "Target": "editing.methods",
    "EditResult": "editing.methods",
    "ChunkDone": "editing.methods",
    "PnPConfig": "editing.configs",
    "P2PConfig": "editing.configs",
    "config_from_settings": "editing.configs",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'editing' has no attribute {name!r}")
