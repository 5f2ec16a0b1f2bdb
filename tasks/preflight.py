"""Checks before a run starts, so that a bad argument is one clear line (exit 2) and an unusable
location one line with exit 3, not a failed shard."""

from __future__ import annotations

from pathlib import Path

from tasks.errors import RunError, StorageUnusable

__all__ = [
    "BadDevice",
    "BadModel",
    "check_device",
    "check_model",
    "check_qa_model",
    "finished_rows",
    "probe_location",
]


class BadModel(RunError):
    """The model argument names nothing loadable (missing, not a diffusers SD folder, pickle-only)."""


class BadDevice(RunError):
    """The device argument is not a torch device, or not one this machine has."""


def check_model(
    model: str,
    *,
    allow_pickle: bool = False,
    revision: str | None = None,
    download: bool = False,
    loras: tuple[str, ...] | list[str] = (),
    model_config: str = "",
) -> str | None:
    """``BadModel`` unless `model` ("" = the bundled reference model) resolves to something loadable
    under the pickle policy: a diffusers SD folder, a hub id in the Hugging Face cache (fetched first
    with `download`), or a single-file checkpoint (its header read, its `model_config` folder present);
    each LoRA must be readable and fit the model's layers (checked on a weightless model built from the
    configs). Returns a hub id's resolved commit (the run pins it), else None. No weights are loaded."""
    from editing import model_forms as forms
    from editing.model import check_weights, model_folder
    from tasks.options import default_model

    ref = model or default_model()
    commit = None
    try:
        if forms.is_single_file(ref):
            names = forms.check_single_file(Path(ref), allow_pickle)
            forms.check_checkpoint_layout(Path(ref), names)
            if model_config and not Path(model_config).is_dir():
                raise ValueError(f"--model-config {model_config} is not a diffusers config folder")
            folder = model_folder(model_config or default_model())
        else:
            folder = model_folder(
                ref, revision=revision, local_files_only=not download, allow_pickle=allow_pickle
            )
            check_weights(Path(folder), allow_pickle)
            if not Path(ref).is_dir():
                commit = Path(folder).name
    except ValueError as exc:  # PickleWeightsRefused and ModelNotCached too
        raise BadModel(f"--model {ref}: {exc}") from None
    try:
        adapters = forms.resolve_loras(loras, download=download, allow_pickle=allow_pickle)
        forms.check_loras_fit(Path(folder), [path for _, path in adapters])
    except ValueError as exc:
        raise BadModel(str(exc) if str(exc).startswith("--lora") else f"--lora: {exc}") from None
    return commit


def check_qa_model(ref: str | None, *, download: bool = False) -> None:
    """``BadModel`` unless `ref` (a run's ``--qa-model``; None: none) holds a CLIP model's config: a
    folder, or a hub id in the Hugging Face cache (fetched with `download`). Only the config is read; a bad
    one found here is one line before the run, not every edit "not judged" in the shards."""
    if not ref:
        return
    if ref.startswith(("/", ".", "~")) and not Path(ref).expanduser().is_dir():
        raise BadModel(f"--qa-model {ref}: no such folder (a CLIP model's folder or hub id)")
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(ref, local_files_only=not download)
    except (OSError, ValueError) as exc:
        raise BadModel(f"--qa-model {ref}: no CLIP model there: {exc}") from None
    if config.model_type != "clip":
        raise BadModel(
            f"--qa-model {ref}: a {config.model_type!r} model, not a CLIP model (transformers' CLIPModel)"
        )


def check_device(device: str | None) -> None:
    """``BadDevice`` unless `device` (None = the default: CUDA if available, else CPU) is cpu, or a
    cuda / mps device this machine has."""
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise BadDevice(
            f"--device {device!r} is not a torch device; use cpu, cuda or cuda:N"
        ) from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise BadDevice(
                f"--device {device}: CUDA is not available on this machine; use --device cpu"
            )
        if dev.index is not None and dev.index >= count:
            raise BadDevice(f"--device {device}: this machine has {count} CUDA device(s)")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise BadDevice(f"--device {device}: MPS is not available on this machine")
    elif dev.type != "cpu":
        raise BadDevice(f"--device {device}: editflow runs on cpu, cuda or mps")


def probe_location(uri: str, *, flag: str, s3_endpoint: str | None = None) -> None:
    """Write and delete a probe object at `uri` (:func:`storage.uri.check_writable`); a failure the user
    must fix (endpoint down, bucket missing, denied, read-only, full, a path that cannot be a folder)
    becomes ``StorageUnusable`` naming `flag`."""
    from storage.errors import describe_storage_error
    from storage.uri import check_writable

    try:
        check_writable(uri, s3_endpoint=s3_endpoint)
    except Exception as exc:
        line = describe_storage_error(exc)
        if line is None:
            if not isinstance(exc, OSError):
                raise
            line = f"{exc.strerror or type(exc).__name__}"
        where = f"{flag}: " if uri in line else f"{flag} {uri}: "
        raise StorageUnusable(where + line) from exc


def finished_rows(manifest_uri: str, out_uri: str, *, s3_endpoint: str | None = None) -> int | None:
    """The manifest's row count when a run of it into `out_uri` would have nothing to do (every edit is
    finished there: in the output's finished-edit index, its image still stored), else None. None too
    for a manifest with problems (the run then reports them) and for an output root without finished
    edits (nothing is read or written then). Stops at the first batch with an unfinished edit; no model, no Prefect."""
    from manifests.stream import ManifestScan, open_manifest
    from storage import keys
    from storage.finished import load_finished
    from storage.uri import open_store
    from tasks.planning import split_finished

    out = open_store(out_uri, s3_endpoint=s3_endpoint)
    if not any(k.endswith(".parquet") for k in out.list(keys.finished_index_prefix())):
        return None  # no index (a new root): nothing finished, and nothing is written here
    done = load_finished(out)
    if not len(done):
        return None
    source = open_manifest(manifest_uri, s3_endpoint=s3_endpoint)
    # structure and values; prompt lengths are checked when there is work
    scan = ManifestScan(source)
    for batch in scan.batches():
        if scan.total:
            return None
        pending, _ = split_finished(batch.normalized(), done)
        if pending.num_rows:
            return None
    scan.finish()
    return None if scan.total or not source.rows else source.rows
