"""The deterministic key layout, in one place: assets, run files, inversion and feature caches.

Every key here is a pure function of its inputs, so reruns and racing workers agree on where
an output belongs (and conditional puts make the first writer win).
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
from collections.abc import Mapping
from typing import Any

__all__ = [
    "EDIT_ID_MAX_LEN",
    "EDIT_ID_MAX_BYTES",
    "UNSAFE_ID_PATTERN",
    "sha256_hex",
    "canonical_json",
    "digest",
    "check_id",
    "IMAGE_FORMATS",
    "IMAGE_EXTENSIONS",
    "assets_prefix",
    "asset_key",
    "sidecar_key",
    "edit_id_of_sidecar",
    "edit_id_of_image",
    "new_run_id",
    "run_prefix",
    "split_run_ref",
    "run_file_key",
    "plan_key",
    "summary_key",
    "run_manifest_key",
    "report_key",
    "contact_sheet_key",
    "failures_key",
    "report_info_key",
    "shard_plan_key",
    "SHARDS_PER_PLAN_PART",
    "shard_plan_part_key",
    "shard_of_plan_key",
    "run_results_prefix",
    "shard_results_key",
    "skipped_results_key",
    "is_results_file",
    "is_shard_results_file",
    "shard_plan_key_of_results",
    "finished_index_prefix",
    "finished_part_key",
    "finished_merged_key",
    "inversion_key",
    "inversion_object_key",
    "features_object_key",
]

# Edit ids become file names: at most 255 *bytes* on common file systems, including ".webp"/".json"
# and the local store's temporary-file decoration (".{name}.tmp-{32 hex}", 38 bytes): 200 UTF-8 bytes.
EDIT_ID_MAX_BYTES = 200
EDIT_ID_MAX_LEN = EDIT_ID_MAX_BYTES  # the older name
# Characters/sequences an id must not contain (it becomes one path segment): '/', '\', '..',
# control characters. Shared with the vectorised manifest check.
UNSAFE_ID_PATTERN = r"[/\\\x00-\x1f\x7f]|\.\."
_UNSAFE_ID_RE = re.compile(UNSAFE_ID_PATTERN)
_HEX64_RE = re.compile(r"^[0-9a-f]{64}$")
_EXT_RE = re.compile(r"^[a-z0-9]{1,10}$")

# The output image formats; each is also its asset key's extension (``assets/{edit_id}.{format}``).
IMAGE_FORMATS: tuple[str, ...] = ("png", "jpeg", "webp")
# Extensions recognised as an edit's image under ``assets/`` (the formats, and "jpg" for JPEG).
IMAGE_EXTENSIONS: tuple[str, ...] = (*IMAGE_FORMATS, "jpg")
_ASSETS = "assets/"
_SIDECAR = ".json"
_PARQUET = ".parquet"
_SHARD = "shard-"
_RUNS = "runs/"


def sha256_hex(data: bytes) -> str:
    """The sha256 of `data` as 64 lowercase hex digits."""
    return hashlib.sha256(data).hexdigest()


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: equal values always give equal text.

    Tuples become lists; NaN/inf and values JSON cannot hold raise ``ValueError``.
    Note that ``50`` and ``50.0`` stay different (callers normalise numeric types).
    """
    try:
        return json.dumps(
            obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )
    except (TypeError, ValueError) as exc:
        raise ValueError(f"not canonical-JSON serialisable: {exc}") from exc


def digest(obj: Any, *, length: int = 64) -> str:
    """sha256 hex of the canonical JSON of `obj`, cut to `length` digits."""
    return sha256_hex(canonical_json(obj).encode("utf-8"))[:length]


def check_id(value: str, *, what: str = "edit_id") -> str:
    """Return `value` if it can be one path segment of a key; else ``ValueError`` naming `what`."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string, got {value!r}")
    size = len(value.encode("utf-8", "surrogatepass"))
    if size > EDIT_ID_MAX_BYTES:
        raise ValueError(
            f"{what} is longer than {EDIT_ID_MAX_BYTES} bytes ({size} bytes in UTF-8): {value[:40]!r}..."
        )
    if _UNSAFE_ID_RE.search(value) or value == ".":
        raise ValueError(
            f"{what} {value!r} is not key-safe (no '/', '\\', '..' or control characters)"
        )
    return value


def _ext(ext: str) -> str:
    ext = ext.lower().lstrip(".")
    if not _EXT_RE.match(ext):
        raise ValueError(f"bad file extension {ext!r}")
    return ext


def assets_prefix() -> str:
    """``assets/``: every edited image and its sidecar (shared by all runs under one output root)."""
    return _ASSETS


def asset_key(edit_id: str, ext: str) -> str:
    """``assets/{edit_id}.{ext}``: the edited image."""
    return f"{_ASSETS}{check_id(edit_id)}.{_ext(ext)}"


def sidecar_key(edit_id: str) -> str:
    """``assets/{edit_id}.json``: the metadata sidecar, written last (the "finished" marker)."""
    return f"{_ASSETS}{check_id(edit_id)}{_SIDECAR}"


def edit_id_of_sidecar(key: str) -> str | None:
    """The edit id whose sidecar `key` is (``assets/{edit_id}.json``), or None for any other key."""
    if key.startswith(_ASSETS) and key.endswith(_SIDECAR):
        return key[len(_ASSETS) : -len(_SIDECAR)]
    return None


def edit_id_of_image(key: str) -> str | None:
    """The edit id whose image `key` is (``assets/{edit_id}.{ext}``, ext one of ``IMAGE_EXTENSIONS``),
    or None for any other key."""
    if not key.startswith(_ASSETS):
        return None
    stem, dot, ext = key[len(_ASSETS) :].rpartition(".")
    return stem if dot and ext in IMAGE_EXTENSIONS else None


def new_run_id() -> str:
    """A fresh, sortable run id: UTC time plus 6 random hex digits (``20250101T120000Z-1a2b3c``)."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)


def run_prefix(run_id: str) -> str:
    """``runs/{run_id}/``: everything one run writes besides assets."""
    return f"{_RUNS}{check_id(run_id, what='run_id')}/"


def split_run_ref(text: str) -> tuple[str | None, str] | None:
    """``(root, run_id)`` of a run's URI or key: ``ROOT/runs/RUN_ID`` gives ``ROOT``, a bare
    ``runs/RUN_ID`` gives None (relative to the output root); None when `text` names no run folder.
    The run id is not checked (see :func:`check_id`); a trailing '/' is ignored."""
    text = text.rstrip("/")
    head, sep, run_id = text.rpartition("/" + _RUNS)
    if sep and run_id and "/" not in run_id:
        return head, run_id
    if text.startswith(_RUNS) and "/" not in text[len(_RUNS) :]:
        return None, text[len(_RUNS) :]
    return None


def run_file_key(run_id: str, name: str) -> str:
    """``runs/{run_id}/{name}``."""
    return run_prefix(run_id) + name


def plan_key(run_id: str) -> str:
    """``runs/{run_id}/plan.json``: the run's plan."""
    return run_file_key(run_id, "plan.json")


def summary_key(run_id: str) -> str:
    """``runs/{run_id}/summary.json``: the run's final counts."""
    return run_file_key(run_id, "summary.json")


def run_manifest_key(run_id: str) -> str:
    """``runs/{run_id}/manifest.parquet``: a manifest the run made itself (restyle's catalog x styles)."""
    return run_file_key(run_id, "manifest.parquet")


REPORT_NAME = "report.html"  # the run's report page, next to the files it links by these names
CONTACT_SHEET_NAME = "contact_sheet.png"
FAILURES_NAME = "failures.csv"


def report_key(run_id: str) -> str:
    """``runs/{run_id}/report.html``: the run's report page."""
    return run_file_key(run_id, REPORT_NAME)


def contact_sheet_key(run_id: str) -> str:
    """``runs/{run_id}/contact_sheet.png``: the report's contact sheet."""
    return run_file_key(run_id, CONTACT_SHEET_NAME)


def failures_key(run_id: str) -> str:
    """``runs/{run_id}/failures.csv``: every failed row of the run (written when there are any)."""
    return run_file_key(run_id, FAILURES_NAME)


def report_info_key(run_id: str) -> str:
    """``runs/{run_id}/report.json``: what the report shows, as JSON."""
    return run_file_key(run_id, "report.json")


def _shard(shard_index: int) -> str:
    if not isinstance(shard_index, int) or isinstance(shard_index, bool) or shard_index < 0:
        raise ValueError(f"shard_index must be a non-negative int, got {shard_index!r}")
    return f"{_SHARD}{shard_index:05d}{_PARQUET}"


def shard_plan_key(run_id: str, shard_index: int) -> str:
    """``runs/{run_id}/shards/shard-{i:05d}.parquet``: the rows of one shard."""
    return run_file_key(run_id, "shards/" + _shard(shard_index))


# Shards whose plans share one file (:func:`shard_plan_part_key`): part of the stored layout, so a
# change needs a new part name. 64 keeps a part to ~16k rows at 256 edits per shard.
SHARDS_PER_PLAN_PART = 64


def shard_plan_part_key(run_id: str, shard_index: int) -> str:
    """``runs/{run_id}/shards/part-{first:05d}.parquet``: the rows of shard `shard_index` and of the
    other shards of its part (the :data:`SHARDS_PER_PLAN_PART` shards from index `first`)."""
    _shard(shard_index)  # checks the index
    first = shard_index - shard_index % SHARDS_PER_PLAN_PART
    return run_file_key(run_id, f"shards/part-{first:05d}{_PARQUET}")


def shard_of_plan_key(key: str) -> tuple[str, int]:
    """``(run_id, shard_index)`` of shard plan key `key` (:func:`shard_plan_key`)."""
    m = re.fullmatch(rf"{_RUNS}([^/]+)/shards/{_SHARD}(\d+){re.escape(_PARQUET)}", key)
    if not m:
        raise ValueError(f"not a shard plan key: {key!r}")
    return m.group(1), int(m.group(2))


def run_results_prefix(run_id: str) -> str:
    """``runs/{run_id}/results/``: the run's results files (one per shard, and the skipped rows)."""
    return run_file_key(run_id, "results/")


def shard_results_key(run_id: str, shard_index: int) -> str:
    """``runs/{run_id}/results/shard-{i:05d}.parquet``: one shard's results."""
    return run_results_prefix(run_id) + _shard(shard_index)


def skipped_results_key(run_id: str) -> str:
    """``runs/{run_id}/results/skipped.parquet``: the rows planning found finished by earlier runs."""
    return run_results_prefix(run_id) + "skipped" + _PARQUET


def is_results_file(run_id: str, key: str) -> bool:
    """Whether `key` (from a listing) is one of the run's results files (a Parquet object under
    :func:`run_results_prefix`)."""
    return key.startswith(run_results_prefix(run_id)) and key.endswith(_PARQUET)


def is_shard_results_file(key: str) -> bool:
    """Whether results file `key` is a shard's (:func:`shard_results_key`), not the skipped rows'."""
    return key.rsplit("/", 1)[-1].startswith(_SHARD)


def shard_plan_key_of_results(key: str) -> str:
    """The shard plan (:func:`shard_plan_key`) of shard results file `key` (:func:`shard_results_key`)."""
    head, _, name = key.rpartition("/")
    run, _, folder = head.rpartition("/")
    if folder != "results" or not name.startswith(_SHARD):
        raise ValueError(f"not a shard results key: {key!r}")
    return f"{run}/shards/{name}"


_FINISHED = "index/finished/"


def finished_index_prefix() -> str:
    """``index/finished/``: the finished-edit index (Parquet parts), shared by all runs under one root."""
    return _FINISHED


def finished_part_key(run_id: str, shard_index: int) -> str:
    """``index/finished/part-{run_id}-shard-{i:05d}.parquet``: the edits one shard of a run finished."""
    return f"{_FINISHED}part-{check_id(run_id, what='run_id')}-{_shard(shard_index)}"


def finished_merged_key(token: str) -> str:
    """``index/finished/merged-{token}.parquet``: parts merged by compaction, or an old root's listing."""
    return f"{_FINISHED}merged-{check_id(token, what='token')}{_PARQUET}"


def inversion_key(content_sha256: str, facts: Mapping[str, Any]) -> str:
    """The inversion cache key: sha256 over the image content hash and the canonical JSON of `facts`.

    `facts` (from the engine) holds everything that shapes an inversion: model id and revision,
    scheduler config, steps, guidance, size policy, source prompt, format version. A changed
    image (new content hash) or any changed fact gives a new key.
    """
    if not isinstance(content_sha256, str) or not _HEX64_RE.match(content_sha256):
        raise ValueError(f"content_sha256 must be 64 lowercase hex digits, got {content_sha256!r}")
    if not isinstance(facts, Mapping):
        raise ValueError(f"facts must be a mapping, got {type(facts).__name__}")
    try:
        facts_json = canonical_json(dict(facts))
    except ValueError as exc:
        raise ValueError(f"inversion facts {dict(facts)!r}: {exc}") from None
    return sha256_hex(f"inversion-v1\n{content_sha256}\n{facts_json}".encode())


def _check_hex_key(key: str) -> str:
    if not isinstance(key, str) or not _HEX64_RE.match(key):
        raise ValueError(f"cache key must be 64 lowercase hex digits, got {key!r}")
    return key


def inversion_object_key(key: str) -> str:
    """``inversions/{key[:2]}/{key}.safetensors``."""
    key = _check_hex_key(key)
    return f"inversions/{key[:2]}/{key}.safetensors"


def features_object_key(key: str, layers_digest: str) -> str:
    """``features/{key[:2]}/{key}-{layers_digest}.safetensors``: cached PnP injection features."""
    key = _check_hex_key(key)
    if not re.match(r"^[0-9a-zA-Z_-]{1,64}$", layers_digest or ""):
        raise ValueError(
            f"layers_digest must be 1-64 characters of [0-9a-zA-Z_-], got {layers_digest!r}"
        )
    return f"features/{key[:2]}/{key}-{layers_digest}.safetensors"
