"""The forms a user's model comes in, resolved to what :func:`editing.model.load_model` loads.

A hub id (from the local Hugging Face cache, fetched once on request), a single-file checkpoint
(``model.safetensors`` in the original Stable Diffusion key layout) and LoRA adapters applied on top.
Each form also gives the model's identity string: the snapshot's commit, the file's content hash, and
each adapter's hash and scale. Only diffusers and huggingface_hub are used here; nothing downloads
unless the caller passes ``download=True``.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
WEIGHT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)
# what --download fetches of a diffusers SD repo: configs, tokenizer files and component weights;
# never a top-level single-file checkpoint or the safety checker (editflow does not use it)
_FETCH_PATTERNS = ("model_index.json", "editflow.json", "*/*.json", "*/*.txt", "*/*.model")
_FETCH_IGNORE = ("safety_checker/*", "feature_extractor/*")


class ModelNotCached(ValueError):
    """A hub id that is not in the local Hugging Face cache, and fetching was not asked for."""


# ---------------------------------------------------------------- LoRA specs


@dataclass(frozen=True)
class LoraSpec:
    """One ``--lora FILE_OR_ID[@SCALE]``: where the adapter is, and the scale it is applied at."""

    source: str  # a .safetensors file, a folder holding one, or a hub id
    # the adapter's weight; 1.0 = as trained, 0.0 = no effect (the base model's weights exactly)
    scale: float = 1.0

    def __str__(self) -> str:
        return f"{self.source}@{self.scale:g}"


def parse_lora(text: str) -> LoraSpec:
    """``FILE_OR_ID[@SCALE]``; the scale is the part after the last ``@`` when it is a number."""
    source, sep, tail = str(text).rpartition("@")
    if sep:
        try:
            scale = float(tail)
        except ValueError:
            source, scale = str(text), 1.0
    else:
        source, scale = str(text), 1.0
    if not source.strip():
        raise ValueError(f"--lora {text!r}: give a file or hub id, optionally followed by @SCALE")
    if scale != scale or abs(scale) > 100:
        raise ValueError(f"--lora {text!r}: the scale must be a number between -100 and 100")
    return LoraSpec(source, scale)


# ---------------------------------------------------------------- hub ids


def _cache_dir() -> str | None:
    """HF_HUB_CACHE read at call time (huggingface_hub reads it once, at import)."""
    return os.environ.get("HF_HUB_CACHE") or None


def _cache_shown() -> str:
    from huggingface_hub import constants

    return _cache_dir() or constants.HF_HUB_CACHE


def fetch_arguments(repo_id: str, revision: str | None, allow_pickle: bool) -> dict[str, Any]:
    """The arguments :func:`fetch` gives ``huggingface_hub.snapshot_download``: safetensors weights
    unless pickle is allowed, the revision pinned when given."""
    patterns = [*_FETCH_PATTERNS, "*/*.safetensors"]
    if allow_pickle:
        patterns += [f"*/*{suffix}" for suffix in PICKLE_SUFFIXES]
    return {
        "repo_id": repo_id,
        "revision": revision,
        "allow_patterns": patterns,
        "ignore_patterns": list(_FETCH_IGNORE),
        "cache_dir": _cache_dir(),
    }


def fetch(repo_id: str, revision: str | None, allow_pickle: bool) -> Path:
    """Download a hub model once into the Hugging Face cache (the one place editflow downloads)."""
    from huggingface_hub import snapshot_download

    args = fetch_arguments(repo_id, revision, allow_pickle)
    try:
        return Path(snapshot_download(**args))
    except Exception as exc:  # noqa: BLE001 - one line for the user, whatever the hub raised
        at = f" at revision {revision}" if revision else ""
        raise ValueError(
            f"could not download {repo_id!r}{at} into the Hugging Face cache "
            f"({type(exc).__name__}: {' '.join(str(exc).split())[:300]})"
        ) from exc


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def is_hub_id(text: str) -> bool:
    """`text` has a hub id's shape (``name`` or ``org/name``), not a path's."""
    return bool(_HUB_ID.fullmatch(text)) and Path(text).suffix not in WEIGHT_SUFFIXES


def hub_snapshot(
    repo_id: str, revision: str | None = None, *, download: bool = False, allow_pickle: bool = False
) -> Path:
    """The cached snapshot folder of a hub id at `revision` (a commit, branch or tag; None = main); its
    name is the resolved commit. When it is not cached: fetched with ``download``, else
    ``ModelNotCached`` says which flag or command fetches it."""
    from huggingface_hub import snapshot_download

    if not is_hub_id(repo_id):
        raise ValueError(f"{repo_id} does not exist (no such folder or file, and not a hub id)")
    try:
        return Path(
            snapshot_download(
                repo_id, revision=revision, local_files_only=True, cache_dir=_cache_dir()
            )
        )
    except Exception as exc:  # noqa: BLE001 - not cached (or not a repo id): maybe fetch it
        if download:
            return fetch(repo_id, revision, allow_pickle)
        at = f" --revision {revision}" if revision else ""
        raise ModelNotCached(
            f"model {repo_id!r}{at} is neither a local folder nor in the local Hugging Face cache "
            f"({_cache_shown()}); add --download to fetch it once "
            f"(safetensors only), or run `hf download {repo_id}{' --revision ' + revision if revision else ''}` "
            f"({type(exc).__name__})"
        ) from exc


# ---------------------------------------------------------------- single files


def is_single_file(source: str | os.PathLike[str]) -> bool:
    """`source` names a checkpoint file (not a diffusers folder)."""
    path = Path(source)
    return path.is_file() and path.suffix in WEIGHT_SUFFIXES


def file_sha256(path: Path) -> str:
    """The file's content hash (the identity of a single-file checkpoint or an adapter)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def check_single_file(path: Path, allow_pickle: bool, *, what: str = "checkpoint") -> list[str]:
    """The tensor names of a safetensors file, read from its header (a truncated or corrupt file is a
    ``ValueError``); a pickle file is refused unless allowed (then nothing is read: it could run code)."""
    from editing.model import PickleWeightsRefused

    if path.suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise PickleWeightsRefused(
                f"{path} is a pickle {what}; pickle files can run code when loaded. Convert it to "
                "safetensors, or opt in with --allow-pickle"
            )
        return []
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: a {what} must be a .safetensors file")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            names = list(f.keys())
            if names:  # the last tensor's bytes must be there too: read it
                f.get_slice(names[-1])[...]
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise ValueError(
            f"{path} is not a readable safetensors {what} (truncated or corrupt: {' '.join(str(exc).split())[:200]})"
        ) from None
    return names


_LDM_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")


def check_checkpoint_layout(path: Path, names: list[str]) -> None:
    """A single-file SD checkpoint holds the UNet, VAE and text encoder in the original key layout."""
    missing = [p for p in _LDM_PREFIXES if not any(n.startswith(p) for n in names)]
    if names and missing:
        raise ValueError(
            f"{path} is not a single-file Stable Diffusion checkpoint: no {', '.join(repr(m + '*') for m in missing)} "
            "tensors (a UNet-only or LoRA file cannot be a --model)"
        )


def load_single_file_pipeline(
    path: Path, config: Path, dtype: Any, vae_dtype: Any, allow_pickle: bool
):
    """A StableDiffusionPipeline from a single-file checkpoint, configured by the local diffusers
    folder `config` (its configs and tokenizer; its weights are not read), the VAE loaded in
    `vae_dtype` and the rest in `dtype`. Never fetches."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    names = check_single_file(path, allow_pickle)
    check_checkpoint_layout(path, names)
    try:
        where = {"config": str(config), "local_files_only": True}
        vae = AutoencoderKL.from_single_file(
            str(path), subfolder="vae", torch_dtype=vae_dtype, **where
        )
        return StableDiffusionPipeline.from_single_file(
            str(path),
            **where,
            vae=vae,
            torch_dtype=dtype,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    except Exception as exc:  # noqa: BLE001 - a mismatch of file and config, told in one line
        raise ValueError(
            f"{path} does not load with the model config {config} "
            f"({type(exc).__name__}: {' '.join(str(exc).split())[:300]}); pass the --model-config of its family"
        ) from exc


# ---------------------------------------------------------------- LoRA adapters


def lora_file(spec: LoraSpec, *, download: bool = False, allow_pickle: bool = False) -> Path:
    """The adapter's weight file: the file itself, or the one weight file of a folder or hub snapshot."""
    path = Path(spec.source)
    looks_like_path = spec.source.startswith((".", "/", "~")) or path.suffix in WEIGHT_SUFFIXES
    if not path.exists() and not looks_like_path:
        path = hub_snapshot(spec.source, download=download, allow_pickle=allow_pickle)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES)
        safe = [p for p in files if p.suffix == ".safetensors"]
        files = safe or files
        if len(files) != 1:
            raise ValueError(
                f"--lora {spec.source}: expected one weight file in {path}, found {len(files)}"
            )
        path = files[0]
    if not path.is_file():
        raise ValueError(f"--lora {spec.source}: no such file, folder or cached hub id")
    check_single_file(path, allow_pickle, what="LoRA")
    return path


def resolve_loras(
    loras: Any, *, download: bool = False, allow_pickle: bool = False
) -> list[tuple[LoraSpec, Path]]:
    """Each ``FILE_OR_ID[@SCALE]`` (or :class:`LoraSpec`) with its weight file, in order."""
    specs = [s if isinstance(s, LoraSpec) else parse_lora(s) for s in loras]
    return [(s, lora_file(s, download=download, allow_pickle=allow_pickle)) for s in specs]


def check_lora_fits(path: Path, unet: Any, text_encoder: Any) -> None:
    """``ValueError`` unless every layer the adapter adapts exists in the model with matching shapes.

    `unet` / `text_encoder` may live on the meta device (built from configs: nothing loaded)."""
    from diffusers import StableDiffusionPipeline

    state, _alphas = StableDiffusionPipeline.lora_state_dict(str(path))
    if not state:
        raise ValueError(f"--lora {path}: holds no LoRA layers")
    modules = {
        "unet": dict(unet.named_modules()),
        "text_encoder": dict(text_encoder.named_modules()),
    }
    for key, tensor in state.items():
        part, _, rest = key.partition(".")
        name, sep, kind = rest.rpartition(".lora_")
        if part not in modules or not sep:
            continue
        module = modules[part].get(name)
        if module is None or not hasattr(module, "weight"):
            raise ValueError(
                f"--lora {path}: its layer {part}.{name} does not exist in this model's {part}; "
                "the adapter was trained for another model"
            )
        out_dim, in_dim = module.weight.shape[:2]
        fits = tensor.shape[1] == in_dim if kind.startswith("A") else tensor.shape[0] == out_dim
        if not fits:
            raise ValueError(
                f"--lora {path}: layer {part}.{name} is {tuple(module.weight.shape)} in this model but "
                f"the adapter's lora_{kind} is {tuple(tensor.shape)}; the adapter was trained for another model"
            )


def check_loras_fit(folder: Path, paths: list[Path]) -> None:
    """:func:`check_lora_fits` for each adapter against the model configured by the diffusers folder
    `folder`, built on the meta device (no weights read or allocated)."""
    if not paths:
        return
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
    for path in paths:
        check_lora_fits(path, unet, text_encoder)


def apply_loras(pipe: Any, loras: list[tuple[LoraSpec, Path]]) -> None:
    """Load each adapter with diffusers' LoRA loader (peft), set its scale, and fuse them all into the
    UNet's and text encoder's weights; the adapter modules are then removed (plain layers remain)."""
    if not loras:
        return
    names = [f"editflow_{i}" for i in range(len(loras))]
    for name, (spec, path) in zip(names, loras):
        try:
            pipe.load_lora_weights(str(path), adapter_name=name)
        except Exception as exc:  # noqa: BLE001 - a mismatched adapter, in one line
            raise ValueError(
                f"--lora {spec.source}: does not fit this model ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"
            ) from exc
    pipe.set_adapters(names, adapter_weights=[spec.scale for spec, _ in loras])
    pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
    pipe.unload_lora_weights()


def lora_identity(loras: list[tuple[LoraSpec, Path]]) -> str:
    """The adapters' part of the model identity: each file's hash prefix and scale, in order."""
    return "".join(f"+lora-{file_sha256(path)[:16]}@{spec.scale:g}" for spec, path in loras)
