"""Checks before a run starts, so that a bad argument is one clear line (exit 2), not a failed shard."""

from __future__ import annotations

from pathlib import Path

from tasks.errors import RunError

__all__ = ["BadModel", "check_model"]


class BadModel(RunError):
    """The model argument names nothing loadable (missing, not a diffusers SD folder, pickle-only)."""


def check_model(model: str, *, allow_pickle: bool = False) -> None:
    """``BadModel`` unless `model` ("" = the bundled reference model) resolves to a diffusers SD folder
    whose weights may be loaded under the pickle policy (nothing is loaded here)."""
    from editing.model import PickleWeightsRefused, check_weights, model_folder
    from tasks.options import default_model

    ref = model or default_model()
    try:
        folder = model_folder(ref)
        check_weights(Path(folder), allow_pickle)
    except PickleWeightsRefused as exc:
        raise BadModel(f"--model {ref}: {exc}") from None
    except ValueError as exc:
        raise BadModel(f"--model {ref}: {exc}") from None
