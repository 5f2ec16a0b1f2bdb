"""Running one shard: read sources, get or compute inversions (content-keyed cache), edit in batches, write.

Plain functions (no Prefect): :mod:`tasks.units` wraps :func:`run_shard` as a task. The shard is a short
pipeline of steps, each returning what the next one needs:

1. :func:`load_shard`: the shard's rows and the results of an earlier attempt;
2. :func:`prepare_sources`: per source image (rows grouped by :func:`tasks.planning.source_key`), read it,
   key its inversion by content, get it from the cache or compute it;
3. :func:`prepare_edits`: per-row checks, the engine's source groups (with cached PnP features);
4. :func:`edit_sources`: the engine's batched edit (it packs, reports each chunk, isolates failures);
   :func:`judge_results`: the edit-QA judge on a chunk's edits (batched), the run's review gate;
5. :class:`ChunkWriter` (in the shard) or :func:`write_jobs` + :func:`write_outputs` (the same writes in
   one go): assets and sidecars, first-writer-wins;
6. :func:`shard_results`: the shard's results table.

The device is kept busy: the model lock (:func:`tasks.worker.model_lock`) is held for model work only.
Sources are read, decoded and looked up in the cache in threads ahead of their inversion, and each chunk
the engine finishes is judged and handed to writer threads (a bounded queue: the model waits only when it
is full) while the next chunk is edited; the shard ends when the last write has landed.

A bad row (unreadable image, missing object, invalid prompt) is recorded as failed with its row, field and
reason, and the shard carries on. A finished edit (its sidecar exists) is never redone or rewritten.
Rerunning a shard keeps its earlier succeeded rows and retries only the failed ones.
"""

from __future__ import annotations

import io
import json
import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable, Collection
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import pyarrow as pa
from PIL import Image

from editing.clip_judge import clip_directional, load_clip
from editing.configs import PnPConfig, config_to_settings
from editing.inversion import Inversion, InversionMismatch, inversion_facts, invert, invert_many
from editing.judge import JudgeConfig, judge_edits, parse_gate
from editing.methods import (
    METHOD_OF_CONFIG,
    ChunkDone,
    EditResult,
    PnPFeatures,
    SourceGroup,
    Target,
    edit,
    pnp_feature_facts,
)
from editing.model import EditModel
from manifests import edit_rows
from manifests.schema import QA_CONTRAST_COLUMN, EditRow, contrast_prompts
from storage import keys
from storage.base import NotFound, ObjectStore
from storage.cache import BlobCache, CorruptEntry
from storage.uri import open_store, read_uri
from storage.writer import encode_image, read_parquet, write_asset, write_parquet
from tasks.images import check_shape, to_rgb
from tasks.options import RunOptions
from tasks.planning import read_shard_plan, source_key
from tasks.progress import ShardProgress
from tasks.results import results_table
from tasks.worker import Behind, apply_thread_policy, get_model, model_lock, read_ahead

logger = logging.getLogger(__name__)


def _version(pkg: str) -> str:
    try:
        return version(pkg)
    except PackageNotFoundError:
        return "unknown"


VERSIONS = {p: _version(p) for p in ("editflow", "diffusers", "torch", "transformers")}
# concurrent encodes + storage requests per shard (S3 latency, not bandwidth, dominates)
WRITE_THREADS = 8
# finished edits (and cache entries) waiting to be written at most; the model waits when it is full
# (a 512 px edit holds ~0.8 MB until written)
WRITE_QUEUE = 4 * WRITE_THREADS
# concurrent source reads (and cache look-ups) per shard, and how many sources they run ahead of the
# one being inverted (each holds its decoded image until its inversion batch runs)
READ_THREADS = 4
READ_AHEAD = 8
# The sidecar items also embedded in the image (PNG text chunk, JPEG comment, WebP EXIF)
EMBEDDED = ("edit_id", "source_prompt", "target_prompt", "method", "settings", "seed", "model_id",
            "model_revision", "source_sha256")  # fmt: skip


class RowError(Exception):
    """A problem with one manifest row, phrased for the user (row, field, reason)."""


@dataclass
class ShardStats:
    edits: int = 0
    succeeded: int = 0
    failed: int = 0
    skipped: int = 0
    inversions_computed: int = 0
    inversion_cache_hits: int = 0
    unet_evals: float = 0.0
    # the edit-QA judge's UNet evaluations (not in unet_evals, which is the edits' own cost)
    qa_unet_evals: int = 0
    needs_review: int = 0  # the shard's succeeded edits its QA gate flagged (earlier attempts' too)
    # wall seconds of the shard's own thread per stage, so they add up to about "total": "read" waiting
    # for its sources (read, decoded, checked and looked up in the inversion cache ahead, in threads),
    # "inversion" inverting, "edit" editing, "qa" judging, "write" what writing adds to the shard: handing
    # finished edits to the writer threads (waiting when their queue is full), waiting for the last ones
    # after the model is done, and the results table. Encodes and writes behind the model count nowhere.
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    def to_dict(self) -> dict[str, Any]:
        d = {
            k: getattr(self, k)
            for k in (
                "edits",
                "succeeded",
                "failed",
                "skipped",
                "inversions_computed",
                "inversion_cache_hits",
                "unet_evals",
                "qa_unet_evals",
                "needs_review",
            )
        }
        d["seconds"] = dict(self.seconds)
        return d


def _result(row: EditRow, status: str, **kw: Any) -> dict[str, Any]:
    """One results row (see :mod:`tasks.results`) of `row`."""
    return {"edit_id": row.edit_id, "status": status, "output_uri": None, "metadata_uri": None, "error": None,
            "reason": None, "cache_hit": None, "unet_evals": None, "seconds": None} | kw  # fmt: skip


# ---------------------------------------------------------------- 1. the shard's rows


@dataclass(frozen=True)
class ShardRows:
    """A planned shard: its normalised rows (as planned, and typed) and an earlier attempt's results."""

    table: pa.Table
    rows: list[EditRow]
    previous: dict[str, dict[str, Any]]  # edit id -> its results row from an earlier attempt

    def kept(self) -> dict[str, dict[str, Any]]:
        """The earlier results that stand: succeeded or skipped edits are never redone."""
        return {r.edit_id: self.previous[r.edit_id] for r in self.rows if self._finished(r.edit_id)}

    def todo(self) -> list[EditRow]:
        """The rows to edit now (planning left out finished edits; a race or an earlier crash is caught
        at write time)."""
        return [r for r in self.rows if not self._finished(r.edit_id)]

    def _finished(self, edit_id: str) -> bool:
        prev = self.previous.get(edit_id)
        return prev is not None and prev["status"] in ("succeeded", "skipped")


def load_shard(out: ObjectStore, run_id: str, shard_index: int) -> ShardRows:
    """The planned rows of shard `shard_index` and the results it wrote before (if it ran before)."""
    table = read_shard_plan(out, run_id, shard_index)
    res_key = keys.shard_results_key(run_id, shard_index)
    previous: dict[str, dict[str, Any]] = {}
    if out.exists(res_key):
        previous = {r["edit_id"]: r for r in read_parquet(out, res_key).to_pylist()}
    return ShardRows(table, list(edit_rows(table)), previous)


# ---------------------------------------------------------------- 2. sources and their inversions


@dataclass(frozen=True)
class Source:
    """One source image of the shard: the rows that edit it and its inversion, or the error that fails
    them all."""

    rows: list[EditRow]
    content_sha256: str = ""
    inversion_key: str = ""
    inversion: Inversion | None = None
    cache_hit: bool = False
    error: str | None = None
    size: tuple[int, int] = (0, 0)  # the source image's (width, height), upright
    # the decoded image, kept only for a CLIP judge (--qa-model: edit QA compares it with each edit)
    image: Image.Image | None = None


@dataclass(frozen=True)
class PreparedSources:
    """:func:`prepare_sources`' result: the sources in first-row order, and the seconds it spent."""

    sources: list[Source]
    # "read": waiting for the sources (read, decoded, checked and looked up in the cache ahead, in
    # threads); "inversion": inverting those the cache lacked
    seconds: dict[str, float]

    @property
    def inversions_computed(self) -> int:
        return sum(s.inversion is not None and not s.cache_hit for s in self.sources)

    @property
    def cache_hits(self) -> int:
        return sum(s.cache_hit for s in self.sources)


def group_sources(rows: list[EditRow]) -> list[list[EditRow]]:
    """`rows` grouped by source (:func:`tasks.planning.source_key`, as planning groups them), in order."""
    groups: dict[tuple, list[EditRow]] = {}
    for row in rows:
        groups.setdefault(source_key(row), []).append(row)
    return list(groups.values())


def read_source(model: EditModel, row: EditRow, options: RunOptions) -> tuple[bytes, Image.Image]:
    """The source image of `row`: its bytes and the decoded, checked RGB image; ``RowError`` naming
    the field when it cannot be read or edited (the source prompt is checked here too)."""
    data, image = read_image(row, options)
    check_source_prompt(model, row)
    return data, image


def check_source_prompt(model: EditModel, row: EditRow) -> None:
    """``RowError`` naming ``source_prompt`` when the model cannot take `row`'s source prompt."""
    try:
        model.tokenize(row.source_prompt)
    except ValueError as exc:
        raise RowError(f"source_prompt: {exc}") from exc


def read_image(row: EditRow, options: RunOptions) -> tuple[bytes, Image.Image]:
    """:func:`read_source` without the prompt check (no model: safe in a reading thread)."""
    try:
        data = read_uri(
            row.image_uri, s3_endpoint=options.s3_endpoint, max_bytes=options.max_source_bytes
        )
    # "no object at s3://...", or for a local file "no such file: /abs/path"
    except NotFound as exc:
        raise RowError(f"image_uri: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - any read failure is this row's problem, with its reason
        raise RowError(
            f"image_uri: could not read {row.image_uri}: {type(exc).__name__}: {exc}"
        ) from exc
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as exc:  # noqa: BLE001
        raise RowError(
            f"image_uri: {row.image_uri} is not a readable image ({type(exc).__name__}: {exc})"
        ) from exc
    try:
        # 16-bit, float, CMYK + profile, EXIF orientation, alpha: see tasks.images
        image = to_rgb(image)
        check_shape(image.width, image.height)
    except Exception as exc:  # noqa: BLE001 - an image that decodes but cannot be edited is this row's problem
        raise RowError(f"image_uri: {row.image_uri}: {type(exc).__name__}: {exc}") from exc
    return data, image


@dataclass(frozen=True)
class CachedInversion:
    """An inversion cache look-up: the entry's key, and the inversion when a usable entry was found."""

    content_sha256: str
    inversion_key: str
    facts: dict[
        str, Any
    ]  # the inversion's facts (editing.inversion.inversion_facts), for invert_many
    inversion: Inversion | None
    stale: bool  # an entry existed but was unusable: replace it


def look_up_inversion(
    model: EditModel, row: EditRow, data: bytes, options: RunOptions, cache: BlobCache
) -> CachedInversion:
    """Key the inversion of `row`'s source by content and facts (computed once here) and read it from
    the cache; an unusable entry (corrupt, other facts, NaN/inf) counts as absent and stale."""
    content = keys.sha256_hex(data)
    facts = inversion_facts(
        model,
        row.source_prompt,
        num_steps=row.num_steps,
        guidance_scale=options.inversion_guidance,
        size_policy=options.size_policy,
    )
    key = keys.inversion_key(content, facts)
    obj = keys.inversion_object_key(key)
    try:
        blob = cache.get(obj)
    except CorruptEntry as exc:
        logger.warning("%s; recomputing it", exc)
        return CachedInversion(content, key, facts, None, stale=True)
    if blob is None:
        return CachedInversion(content, key, facts, None, stale=False)
    try:
        inv = Inversion.from_bytes(blob, expect=facts)
        _check_finite_tensors(inv.latents, inv.corrections, inv.cond, inv.uncond)
    except InversionMismatch as exc:
        logger.warning("inversion cache entry %s is unusable (%s); recomputing it", obj, exc)
        return CachedInversion(content, key, facts, None, stale=True)
    return CachedInversion(content, key, facts, inv, stale=False)


def _check_finite_tensors(*tensors) -> None:
    """``InversionMismatch`` when a cached tensor holds NaN/inf (such an entry must be recomputed)."""
    import torch

    for t in tensors:
        if not torch.isfinite(t).all():
            raise InversionMismatch("entry holds non-finite values (NaN/inf)")


def invert_sources(
    model: EditModel,
    images: list[Image.Image],
    prompts: list[str],
    num_steps: int,
    options: RunOptions,
    facts: list[dict[str, Any]],
) -> list[Inversion | Exception]:
    """Invert the images (one step count) sharing UNet calls, :func:`inversion_batch` sources per call;
    if that fails, one by one, so a bad source fails alone (its exception in its place). `facts`: each
    image's, from its cache look-up. A compiled UNet runs them at padded shapes (invert_many's rule)."""
    per_call = inversion_batch(options)
    try:
        return list(invert_many(
            model, images, prompts, num_steps=num_steps, guidance_scale=options.inversion_guidance,
            size_policy=options.size_policy, max_batch=per_call, facts=facts,
        ))  # fmt: skip
    except Exception:  # noqa: BLE001 - find the one that fails
        pass
    out: list[Inversion | Exception] = []
    for image, prompt, f in zip(images, prompts, facts):
        try:
            out.append(invert(model, image, prompt, num_steps=num_steps, facts=f,
                              guidance_scale=options.inversion_guidance, size_policy=options.size_policy))  # fmt: skip
        except Exception as exc:  # noqa: BLE001
            out.append(exc)
    return out


def inversion_batch(options: RunOptions) -> int:
    """Sources per inversion UNet call: at least 4 (the inversion's rows, 1 and 2 per source, stay under
    an editing chunk's 2 per target + 1 per source)."""
    return max(options.max_batch, 4)


def fetch_source(
    model: EditModel, row: EditRow, options: RunOptions, cache: BlobCache
) -> tuple[Image.Image, CachedInversion]:
    """A source read and decoded (:func:`read_image`) and its inversion looked up in the cache: the
    storage half of preparing a source, which runs in reading threads without the model lock."""
    data, image = read_image(row, options)
    return image, look_up_inversion(model, row, data, options, cache)


def prepare_sources(
    model: EditModel,
    rows: list[EditRow],
    options: RunOptions,
    cache: BlobCache,
    *,
    lock: AbstractContextManager | None = None,
    behind: Behind | None = None,
) -> PreparedSources:
    """Each source of `rows` with its inversion: read, keyed, taken from the cache or computed (sources
    without one share UNet calls, per step count and size) and cached; or with the error that fails its
    rows.

    Sources are read and looked up in :data:`READ_THREADS` threads, up to :data:`READ_AHEAD` ahead, while
    the sources before them are inverted (under `lock`, the model's: :func:`tasks.worker.model_lock`); each
    full batch of :func:`inversion_batch` sources of one step count and size is inverted as soon as it is
    read (the same batches as inverting them all at the end). New cache entries are written by `behind`
    (in its threads) when given, else here."""
    lock = lock or nullcontext()
    seconds = {"read": 0.0, "inversion": 0.0}
    sources: list[Source] = []
    # batch key (_batch_key) -> the sources read that wait for their inversion
    waiting: dict[tuple, list[tuple[int, Image.Image, CachedInversion]]] = {}

    def invert_batch(items: list[tuple[int, Image.Image, CachedInversion]]) -> None:
        t0 = time.perf_counter()
        steps = sources[items[0][0]].rows[0].num_steps
        prompts = [sources[i].rows[0].source_prompt for i, _, _ in items]
        facts = [found.facts for _, _, found in items]
        with lock:
            invs = invert_sources(model, [im for _, im, _ in items], prompts, steps, options, facts)
        for (i, _, found), inv in zip(items, invs):
            if isinstance(inv, Exception):
                error = f"image_uri/source_prompt: cannot invert: {type(inv).__name__}: {inv}"
                sources[i] = replace(sources[i], error=error)
                continue
            obj = keys.inversion_object_key(found.inversion_key)
            put = cache.replace if found.stale else cache.put
            if behind is None:
                _put_bytes(put, obj, inv.to_bytes)
            else:
                behind.submit(_put_bytes, put, obj, inv.to_bytes)
            sources[i] = replace(sources[i], inversion=inv)
        seconds["inversion"] += time.perf_counter() - t0

    groups = group_sources(rows)
    with ThreadPoolExecutor(READ_THREADS, thread_name_prefix="shard-read") as pool:
        fetched = read_ahead(
            pool, lambda g: fetch_source(model, g[0], options, cache), groups, READ_AHEAD
        )
        for group, job in zip(groups, fetched):
            t0 = time.perf_counter()
            try:
                image, found = job.result()
                with lock:
                    check_source_prompt(model, group[0])
            except RowError as exc:
                sources.append(Source(group, error=str(exc)))
                continue
            finally:
                seconds["read"] += time.perf_counter() - t0
            sources.append(Source(group, found.content_sha256, found.inversion_key, found.inversion,
                                  cache_hit=found.inversion is not None, size=image.size,
                                  image=image if options.qa_model else None))  # fmt: skip
            if found.inversion is None:
                key = _batch_key(model, group[0], image, options, len(sources))
                batch = waiting.setdefault(key, [])
                batch.append((len(sources) - 1, image, found))
                if len(batch) == inversion_batch(options):
                    invert_batch(waiting.pop(key))
    for batch in waiting.values():
        invert_batch(batch)
    return PreparedSources(sources, dict(seconds))


def _put_bytes(put: Callable[[str, bytes], Any], key: str, data: Callable[[], bytes]) -> None:
    """``put(key, data())``: a cache entry serialised and written (in a writer thread when handed to one)."""
    put(key, data())


def _batch_key(
    model: EditModel, row: EditRow, image: Image.Image, options: RunOptions, n: int
) -> tuple:
    """The sources that share inversion UNet calls: one step count and one model-side size (as
    :func:`editing.inversion.invert_many` groups them); a size the model refuses, alone (`n`: unique)."""
    try:
        return row.num_steps, model.target_size(image.width, image.height, options.size_policy)
    except ValueError:
        return row.num_steps, n


# ---------------------------------------------------------------- 3. what to edit


@dataclass(frozen=True)
class EditGroup:
    """A source's rows that passed the per-row checks, and the engine's group of them (same order)."""

    source: Source
    rows: list[EditRow]
    group: SourceGroup  # the source's inversion, one target per row, cached PnP features if any
    features_key: str = ""  # the PnP feature cache entry to fill ("" when features are not cached)
    stale_features: bool = False  # that entry existed but was unusable: replace it


@dataclass(frozen=True)
class PreparedEdits:
    """:func:`prepare_edits`' result: the groups to edit and the rows failed before editing."""

    groups: list[EditGroup]
    failed: dict[str, dict[str, Any]]  # edit id -> its results row


def prepare_edits(
    model: EditModel,
    sources: list[Source],
    options: RunOptions,
    cache: BlobCache,
    *,
    lock: AbstractContextManager | None = None,
) -> PreparedEdits:
    """The edit groups of the sources with an inversion: each row's target prompt and settings checked
    (a bad one fails its row; the tokenizer under `lock`), and, with ``cache_features``, the source's
    cached PnP features attached (read without it)."""
    lock = lock or nullcontext()
    groups: list[EditGroup] = []
    failed: dict[str, dict[str, Any]] = {}
    for src in sources:
        if src.error:
            for row in src.rows:
                failed[row.edit_id] = _result(row, "failed", error=f"row {row.row}: {src.error}")
            continue
        targets, kept = [], []
        with lock:
            for row in src.rows:
                try:
                    model.tokenize(row.target_prompt)
                    config = row.config
                except ValueError as exc:
                    failed[row.edit_id] = _result(
                        row, "failed", error=f"row {row.row}: target_prompt/settings: {exc}"
                    )
                    continue
                targets.append(
                    Target(row.target_prompt, config, edit_id=row.edit_id, seed=row.seed)
                )
                kept.append(row)
        if not targets:
            continue
        features = CachedFeatures()
        if options.cache_features:
            features = look_up_features(model, src, targets, cache)
        group = SourceGroup(src.inversion, targets, features.features)
        groups.append(EditGroup(src, kept, group, features.key, features.stale))
    return PreparedEdits(groups, failed)


@dataclass(frozen=True)
class CachedFeatures:
    """A PnP feature cache look-up: the entry's key ("" when the group shares no PnP config) and the
    features when a usable entry was found."""

    key: str = ""
    features: PnPFeatures | None = None
    stale: bool = False


def _pnp_config_of(targets: list[Target]) -> PnPConfig | None:
    """The one PnP config whose features a group can share (None if mixed or no PnP targets)."""
    cfgs = {
        (
            t.config.feature_layers,
            t.config.attn_layers,
            t.config.feature_t,
            t.config.attn_t,
            t.config.source_text,
        )
        for t in targets
        if isinstance(t.config, PnPConfig)
    }
    if len(cfgs) != 1:
        return None
    return next(t.config for t in targets if isinstance(t.config, PnPConfig))


def look_up_features(
    model: EditModel, src: Source, targets: list[Target], cache: BlobCache
) -> CachedFeatures:
    """The source's cached PnP features for the targets' shared PnP config (facts computed once here)."""
    config = _pnp_config_of(targets)
    if config is None:
        return CachedFeatures()
    facts = pnp_feature_facts(model, src.inversion, config)
    key = keys.features_object_key(
        src.inversion_key,
        keys.digest({k: v for k, v in facts.items() if k != "inversion"}, length=16),
    )
    try:
        blob = cache.get(key)
    except CorruptEntry as exc:
        logger.warning("%s; recomputing it", exc)
        return CachedFeatures(key, stale=True)
    if blob is None:
        return CachedFeatures(key)
    try:
        features = PnPFeatures.from_bytes(blob, expect={"inversion": facts["inversion"]})
        _check_finite_tensors(*features.tensors.values())
    except ValueError as exc:
        logger.warning("feature cache entry %s is unusable (%s); recomputing it", key, exc)
        return CachedFeatures(key, stale=True)
    return CachedFeatures(key, features)


# ---------------------------------------------------------------- 4. editing


Edited = list[EditResult | Exception]  # one group's results, in its targets' order


def edit_sources(
    model: EditModel,
    groups: list[SourceGroup],
    options: RunOptions,
    progress: ShardProgress | None = None,
    on_chunk: Callable[[ChunkDone], None] | None = None,
) -> list[Edited]:
    """The engine's :func:`editing.methods.edit` of all the groups (it packs them, and isolates a failing
    edit); each finished chunk's edits are reported to `progress`, and the chunk to `on_chunk` (with its
    outcomes: the shard writes them while the next chunk is edited). Results per group, as the input."""

    def chunk_done(done: ChunkDone) -> None:
        if progress is not None:
            progress.add(done.targets)
        if on_chunk is not None:
            on_chunk(done)

    return edit(
        model,
        groups,
        max_batch=options.max_batch,
        record_features=options.cache_features,
        on_chunk=chunk_done,
    )


# ---------------------------------------------------------------- 4b. edit QA

# The judge's settings in every run: editing.judge's measured defaults (8 UNet evaluations per edit);
# its UNet rows per call are capped by the run's max_batch (see judge_config)
JUDGE = JudgeConfig()


def judge_config(options: RunOptions) -> JudgeConfig:
    """:data:`JUDGE` with at most as many UNet rows (and VAE images) per call as the run's own edit
    chunks can have (2 x max_batch target rows + a source row per image), so that a max_batch chosen to
    fit the device fits the judge too."""
    return replace(JUDGE, max_batch=3 * options.max_batch, derived_contrasts=options.qa_derived)


@dataclass(frozen=True)
class EditQA:
    """One edit's QA: the judge's text margin and why the run's gate flags it (no reasons: it passes)."""

    # the margin (editing.judge.text_margin); None: not judged (the judge failed); NaN: nothing to
    # compare (the target prompt is the source prompt)
    text: float | None
    reasons: tuple[str, ...]
    gate: str  # the gate's spec
    judge: dict[str, Any]  # the judge's settings (JudgeConfig.to_settings())
    unet_evals: int = 0
    # CLIP directional similarity (editing.clip_judge) with the run's qa_model; None: not scored
    clip: float | None = None
    clip_model: str | None = None

    def columns(self) -> dict[str, Any]:
        """The results row's ``qa_text``, ``qa`` (null when the edit passes) and ``qa_clip``."""
        return {"qa_text": self.text, "qa": "; ".join(self.reasons) or None, "qa_clip": self.clip}

    def sidecar(self) -> dict[str, Any]:
        """The sidecar's ``qa`` item (JSON: a NaN score is written as null, its reason says why)."""
        text = self.text if self.text is not None and math.isfinite(self.text) else None
        out = {"text": text, "needs_review": bool(self.reasons), "reasons": list(self.reasons),
               "gate": self.gate, "judge": self.judge, "unet_evals": self.unet_evals}  # fmt: skip
        if self.clip_model:
            clip = self.clip if self.clip is not None and math.isfinite(self.clip) else None
            out |= {"clip": clip, "clip_model": self.clip_model}
        return out


def judge_results(
    model: EditModel, groups: list[EditGroup], edited: list[Edited], options: RunOptions
) -> dict[str, EditQA]:
    """Every succeeded edit judged against its target and source prompts, and its manifest's
    ``qa_contrast`` prompts if any (editing.judge; one call for the given edits, a finished chunk's in a
    run, so the judge's UNet rows batch across them) and checked by the run's gate `options.qa`; by edit id. Nothing (no cost) with ``qa="off"``. The judge reads the edited image as it is stored
    (VAE-encoded again): its gate was calibrated on images, and an edit's final latents score differently.
    A judge that fails flags the edits (not judged) and fails none; a row whose contrast prompts the model
    cannot take (too long) flags that edit alone."""
    gate = parse_gate(options.qa)
    done = [(row, res) for eg, results in zip(groups, edited) for row, res in zip(eg.rows, results)
            if isinstance(res, EditResult)]  # fmt: skip
    if not gate.enabled or not done:
        return {}
    config = judge_config(options)
    # validated with the manifest (manifests.validate); a row without any: the source prompt alone
    contrasts, unusable, judged = [], {}, []
    for row, res in done:
        try:
            prompts = contrast_prompts(row.passthrough.get(QA_CONTRAST_COLUMN))
            for prompt in prompts:
                model.tokenize(prompt)  # the prompt length check editing makes on the row's prompts
        except ValueError as exc:
            unusable[row.edit_id] = EditQA(
                None, (f"not judged: {QA_CONTRAST_COLUMN}: {exc}",), gate.spec, config.to_settings()
            )
        else:
            contrasts.append(prompts)
            judged.append((row, res))
    done = judged
    if not done:
        return unusable
    try:
        scores = judge_edits(
            model, [res.image for _, res in done], [row.source_prompt for row, _ in done],
            [row.target_prompt for row, _ in done], config, contrasts if any(contrasts) else None,
            size_policy=options.size_policy,
        )  # fmt: skip
        clips: list[float | None] = [None] * len(done)
        if options.qa_model:
            # the CLIP model once per worker process (editing.clip_judge.load_clip caches it); each
            # source image as prepare_sources decoded it (kept for this), not read again
            judge = load_clip(options.qa_model, str(model.device))
            image_of = {row.edit_id: eg.source.image for eg in groups for row in eg.rows}
            clips = list(clip_directional(
                judge, [image_of[row.edit_id] for row, _ in done], [res.image for _, res in done],
                [row.source_prompt for row, _ in done], [row.target_prompt for row, _ in done],
                max_batch=config.max_batch,
            ))  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - QA never fails an edit; the edits stand, flagged
        logger.warning("edit QA failed on %d edits: %s: %s", len(done), type(exc).__name__, exc)
        reason = f"not judged: {type(exc).__name__}: {exc}"
        return unusable | {row.edit_id: EditQA(None, (reason,), gate.spec, config.to_settings())
                           for row, _ in done}  # fmt: skip
    return unusable | {
        row.edit_id: EditQA(
            sc.text,
            tuple(gate.check({**sc.as_dict(), **({} if c is None else {"clip": c})})),
            gate.spec,
            config.to_settings(),
            sc.unet_evals,
            c,
            options.qa_model,
        )  # fmt: skip
        for (row, _), sc, c in zip(done, scores, clips)
    }


def store_features(cache: BlobCache, groups: list[EditGroup], edited: list[Edited]) -> int:
    """Cache the PnP features recorded for each group that had none cached (the first PnP result's);
    returns how many entries were written."""
    found = features_to_store(groups, outcomes_of(edited))
    for gi, features in found.items():
        _store_features(cache, groups[gi], features)
    return len(found)


Outcomes = list[tuple[int, int, EditResult | Exception]]  # (group index, target index, outcome)


def outcomes_of(edited: list[Edited]) -> Outcomes:
    """The groups' results as (group index, target index, outcome), group by group."""
    return [(gi, ti, r) for gi, results in enumerate(edited) for ti, r in enumerate(results)]


def features_to_store(
    groups: list[EditGroup], outcomes: Outcomes, done: Collection[int] = ()
) -> dict[int, PnPFeatures]:
    """By group index, the PnP features to cache for the groups (not in `done`) that had none cached: the
    first PnP outcome's in `outcomes` that recorded them."""
    found: dict[int, PnPFeatures] = {}
    for gi, ti, r in outcomes:
        eg = groups[gi]
        if gi in done or gi in found or not eg.features_key or eg.group.features is not None:
            continue
        if (
            isinstance(r, EditResult)
            and r.features is not None
            and METHOD_OF_CONFIG[type(eg.group.targets[ti].config)] == "pnp"
        ):
            found[gi] = r.features
    return found


def _store_features(cache: BlobCache, eg: EditGroup, features: PnPFeatures) -> None:
    (cache.replace if eg.stale_features else cache.put)(eg.features_key, features.to_bytes())


# ---------------------------------------------------------------- 5. writing


@dataclass(frozen=True)
class WriteJob:
    """One edited image to store with its sidecar, and the cost its results row reports."""

    row: EditRow
    image: Image.Image
    metadata: dict[str, Any]  # the sidecar (write_asset adds the output's uri and sha256)
    cache_hit: bool  # the inversion came from the cache
    unet_evals: float  # this edit's UNet evaluations, its share of the inversion's included
    seconds: float
    qa: EditQA | None = None  # its edit QA (None: not judged, --qa off)


def write_jobs(
    model: EditModel,
    run_id: str,
    groups: list[EditGroup],
    edited: list[Edited],
    options: RunOptions | None = None,
    qa: dict[str, EditQA] | None = None,
) -> tuple[list[WriteJob], dict[str, dict[str, Any]]]:
    """A write job per edit that succeeded (with its QA from `qa`, by edit id), and the results rows of
    those that failed. Each edit is at `options.output_size` (None: as the model made it)."""
    jobs: list[WriteJob] = []
    failed: dict[str, dict[str, Any]] = {}
    for gi, ti, res in outcomes_of(edited):
        row = groups[gi].rows[ti]
        if isinstance(res, Exception):
            failed[row.edit_id] = edit_failed(row, res)
        else:
            jobs.append(edit_job(model, run_id, groups[gi], ti, res, options, qa))
    return jobs, failed


def edit_failed(row: EditRow, exc: Exception) -> dict[str, Any]:
    """The results row of an edit the engine failed."""
    return _result(row, "failed", error=f"row {row.row}: edit failed: {type(exc).__name__}: {exc}")


def edit_job(
    model: EditModel,
    run_id: str,
    eg: EditGroup,
    ti: int,
    res: EditResult,
    options: RunOptions | None = None,
    qa: dict[str, EditQA] | None = None,
) -> WriteJob:
    """The write job of the group's `ti`-th edit, with its QA from `qa` (by edit id) if there."""
    row = eg.rows[ti]
    job = _write_job(model, run_id, eg, row, eg.group.targets[ti], res, options)
    if qa and row.edit_id in qa:
        job = replace(job, qa=qa[row.edit_id])
        job.metadata["qa"] = job.qa.sidecar()
    return job


def _write_job(
    model: EditModel,
    run_id: str,
    eg: EditGroup,
    row: EditRow,
    target: Target,
    res: EditResult,
    options: RunOptions | None = None,
) -> WriteJob:
    """The job of one edit: its image at the output size, its cost (a computed inversion shared by the
    source's edits) and sidecar (the model-side, source and output sizes)."""
    src, share = eg.source, len(eg.rows)
    image = res.image
    if options is not None and options.output_size == "source":
        image = model.restore_image(image, src.size, options.size_policy)
    inv_share = (src.inversion.unet_evals if not src.cache_hit else 0) / share
    evals = inv_share + sum(res.unet_evals.values())  # padding rows' share included when padded
    seconds = res.seconds + src.inversion.seconds / share * (not src.cache_hit)
    metadata = {
        "edit_id": row.edit_id,
        "run_id": run_id,
        "row": row.row,
        "source_uri": row.image_uri,
        "source_sha256": src.content_sha256,
        "source_prompt": row.source_prompt,
        "target_prompt": row.target_prompt,
        "method": row.method,
        "settings": config_to_settings(target.config),
        "seed": row.seed,
        "num_steps": row.num_steps,
        "model_id": model.model_id,
        "model_revision": model.revision,
        "inversion_key": src.inversion_key,
        "inversion_cache_hit": src.cache_hit,
        "features_cache_hit": eg.group.features is not None and row.method == "pnp",
        "unet_evals": evals,
        "unet_evals_detail": dict(res.unet_evals),
        "seconds": seconds,
        # (width, height): the output's, the edit's as the model made it, and the source image's
        "size": list(image.size),
        "model_size": list(res.image.size),
        "source_size": list(src.size),
        "versions": VERSIONS,
        "passthrough": row.passthrough,
    }
    return WriteJob(row, image, metadata, src.cache_hit, evals, seconds)


def write_outputs(
    out: ObjectStore, image_format: str, jobs: list[WriteJob]
) -> dict[str, dict[str, Any]]:
    """Write every job (encodes and storage requests overlap in a small thread pool); results rows by
    edit id: succeeded, skipped (finished earlier or by another worker) or failed (storage error)."""
    with ThreadPoolExecutor(max_workers=WRITE_THREADS) as pool:
        outcomes = list(pool.map(lambda job: write_one(out, image_format, job), jobs))
    return {job.row.edit_id: outcome for job, outcome in zip(jobs, outcomes)}


def write_one(out: ObjectStore, image_format: str, job: WriteJob) -> dict[str, Any]:
    """Encode one edit (its identity embedded) and write it and its sidecar, first-writer-wins."""
    row, meta = job.row, job.metadata
    essentials = {k: meta[k] for k in EMBEDDED}
    try:
        data = encode_image(
            job.image, image_format, {"editflow": json.dumps(essentials, sort_keys=True)}
        )
        asset_uri, sidecar_uri, written = write_asset(out, row.edit_id, data, image_format, meta)
    except Exception as exc:  # noqa: BLE001 - a storage failure of one edit fails that edit
        return _result(
            row,
            "failed",
            error=f"row {row.row}: writing output failed: {type(exc).__name__}: {exc}",
        )
    return _result(
        row, "succeeded" if written else "skipped", output_uri=asset_uri, metadata_uri=sidecar_uri,
        cache_hit=job.cache_hit, unet_evals=job.unet_evals, seconds=job.seconds,
        reason=None if written else "finished earlier or by another worker",
        **(job.qa.columns() if job.qa is not None else {}),
    )  # fmt: skip


class ChunkWriter:
    """The shard's edits written chunk by chunk while the model edits the next (the engine's ``on_chunk``,
    called with the model lock held): each finished chunk is judged (:func:`judge_results`, model work),
    then its edits' encodes and writes and its PnP features' cache entries are handed to `behind`'s threads
    (waiting while their queue is full). :meth:`results` waits for them: results rows by edit id."""

    def __init__(
        self,
        model: EditModel,
        run_id: str,
        groups: list[EditGroup],
        options: RunOptions,
        out: ObjectStore,
        cache: BlobCache,
        behind: Behind,
    ) -> None:
        self.model, self.run_id, self.groups, self.options = model, run_id, groups, options
        self.out, self.cache, self.behind = out, cache, behind
        self.failed: dict[str, dict[str, Any]] = {}  # edits the engine failed
        self.qa_seconds = 0.0  # judging
        self.qa_unet_evals = 0
        # handing edits to the writer threads (a full queue's waits included)
        self.handoff_seconds = 0.0
        # each handed edit's id and the future of its write (its results row and UNet evaluations)
        self._writes: list[tuple[str, Future]] = []
        self._features: set[int] = set()  # groups whose features are being cached

    def __call__(self, done: ChunkDone) -> None:
        outcomes = list(done.outcomes)
        t0 = time.perf_counter()
        qa = judge_results(self.model, *self._chunk_groups(outcomes), self.options)
        if qa:
            self.qa_seconds += time.perf_counter() - t0
            self.qa_unet_evals += sum(q.unet_evals for q in qa.values())
        t0 = time.perf_counter()
        for gi, features in features_to_store(self.groups, outcomes, self._features).items():
            self._features.add(gi)
            self.behind.submit(_store_features, self.cache, self.groups[gi], features)
        for gi, ti, res in outcomes:
            row = self.groups[gi].rows[ti]
            if isinstance(res, Exception):
                self.failed[row.edit_id] = edit_failed(row, res)
                continue
            job = self.behind.submit(self._write, self.groups[gi], ti, res, qa)
            self._writes.append((row.edit_id, job))
        self.handoff_seconds += time.perf_counter() - t0

    def _chunk_groups(self, outcomes: Outcomes) -> tuple[list[EditGroup], list[Edited]]:
        """The chunk's edits as groups of the edited rows only (the judge's input)."""
        by_group: dict[int, list[tuple[int, EditResult | Exception]]] = {}
        for gi, ti, res in outcomes:
            by_group.setdefault(gi, []).append((ti, res))
        groups, edited = [], []
        for gi, items in by_group.items():
            eg = self.groups[gi]
            targets = [eg.group.targets[ti] for ti, _ in items]
            rows = [eg.rows[ti] for ti, _ in items]
            groups.append(replace(eg, rows=rows, group=replace(eg.group, targets=targets)))
            edited.append([res for _, res in items])
        return groups, edited

    def _write(
        self, eg: EditGroup, ti: int, res: EditResult, qa: dict[str, EditQA]
    ) -> tuple[float, dict[str, Any]]:
        """One edit encoded and written (in a writer thread): its UNet evaluations and results row."""
        row = eg.rows[ti]
        try:
            job = edit_job(self.model, self.run_id, eg, ti, res, self.options, qa)
        except Exception as exc:  # noqa: BLE001 - this edit's output cannot be made: it fails alone
            return 0.0, _result(row, "failed", error=f"row {row.row}: writing output failed: "
                                f"{type(exc).__name__}: {exc}")  # fmt: skip
        return job.unet_evals, write_one(self.out, self.options.image_format, job)

    def results(self) -> tuple[dict[str, dict[str, Any]], float]:
        """Every handed edit's results row (waiting for its write), the failed edits' too, by edit id; and
        the written edits' UNet evaluations."""
        rows, evals = dict(self.failed), 0.0
        for edit_id, job in self._writes:
            n, rows[edit_id] = job.result()
            evals += n
        return rows, evals


# ---------------------------------------------------------------- 6. results


def shard_results(shard: ShardRows, results: dict[str, dict[str, Any]]) -> pa.Table:
    """The shard's results table: one row per planned row, in plan order, with its passthrough columns."""
    return results_table([results[r.edit_id] for r in shard.rows], shard.table)


# ---------------------------------------------------------------- the pipeline


def run_shard(options: RunOptions, run_id: str, shard_index: int) -> dict[str, Any]:
    """Run (or finish) one planned shard; write its results Parquet; return its stats."""
    t_start = time.perf_counter()
    out = open_store(options.out, s3_endpoint=options.s3_endpoint)
    # the default cache is the output root's child: a link at {out}/cache is refused, not followed
    cache = BlobCache(
        out.child("cache")
        if not options.cache
        else open_store(options.cache, s3_endpoint=options.s3_endpoint)
    )
    shard = load_shard(out, run_id, shard_index)
    stats = ShardStats(edits=len(shard.rows))
    results = shard.kept()
    todo = shard.todo()
    # finished edits, published after the sources and per batch (tasks.progress)
    progress = ShardProgress(run_id, shard_index, len(shard.rows))
    progress.set(len(results))
    threads = None
    if todo:
        # once per worker process: its share of the CPUs
        threads = apply_thread_policy(options.threads)
        progress.stage("model", model=options.model_ref)
        model = get_model(
            options.model_ref,
            device=options.device,
            dtype=options.dtype,
            **options.model_args(),
        )
        lock = model_lock(model)
        if (
            options.qa_model
        ):  # the CLIP judge loaded (once per process) before the lock, not under it
            try:
                load_clip(options.qa_model, str(model.device))
            except ValueError as exc:  # judge_results flags the edits "not judged" with this reason
                logger.warning("edit QA: %s", exc)
        # the model lock is held for model work only; storage and encodes run in these threads
        with Behind(WRITE_THREADS, WRITE_QUEUE, name="shard-write") as behind:
            progress.stage("invert", sources=len(group_sources(todo)))
            prepared = prepare_sources(model, todo, options, cache, lock=lock, behind=behind)
            for stage, seconds in prepared.seconds.items():
                stats.seconds[stage] += seconds
            stats.inversions_computed += prepared.inversions_computed
            stats.inversion_cache_hits += prepared.cache_hits
            edits = prepare_edits(model, prepared.sources, options, cache, lock=lock)
            results |= edits.failed
            # rows kept from earlier and rows failed before editing are finished
            progress.set(
                len(results), failed=sum(r["status"] == "failed" for r in results.values())
            )
            writer = ChunkWriter(model, run_id, edits.groups, options, out, cache, behind)
            if edits.groups:
                progress.stage("edit", edits=sum(len(eg.rows) for eg in edits.groups))
                t0 = time.perf_counter()
                with lock:
                    edit_sources(
                        model, [eg.group for eg in edits.groups], options, progress, writer
                    )
                t_edit = time.perf_counter() - t0
                stats.seconds["edit"] += t_edit - writer.qa_seconds - writer.handoff_seconds
                if writer.qa_seconds:
                    stats.seconds["qa"] += writer.qa_seconds
                stats.qa_unet_evals += writer.qa_unet_evals
                progress.stage("write", edits=sum(len(eg.rows) for eg in edits.groups))
            t0 = time.perf_counter()
            behind.drain()  # the edits' writes and the cache entries (the first failure raised)
            written, evals = writer.results()
            results |= written
            stats.unet_evals += evals
            stats.seconds["write"] += writer.handoff_seconds + time.perf_counter() - t0
    for r in results.values():
        stats.succeeded += r["status"] == "succeeded"
        stats.failed += r["status"] == "failed"
        stats.skipped += r["status"] == "skipped"
        stats.needs_review += r["status"] == "succeeded" and r.get("qa") is not None
    t0 = time.perf_counter()
    table = shard_results(shard, results)
    write_parquet(out, keys.shard_results_key(run_id, shard_index), table)
    stats.seconds["write"] += time.perf_counter() - t0
    stats.seconds["total"] = time.perf_counter() - t_start
    logger.info("shard %d: %s", shard_index, stats.to_dict())
    return {"shard": shard_index, **stats.to_dict(), "threads": threads}


def read_run_results(options: RunOptions, run_id: str) -> pa.Table:
    """All results files of a run concatenated (skipped rows included)."""
    out = open_store(options.out, s3_endpoint=options.s3_endpoint)
    tables = [
        read_parquet(out, k)
        for k in sorted(out.list(keys.run_results_prefix(run_id)))
        if keys.is_results_file(run_id, k)
    ]
    if not tables:
        return pa.table({})
    return pa.concat_tables(tables, promote_options="permissive")


__all__ = ["run_shard", "read_run_results", "RowError"]
