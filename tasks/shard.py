"""Running one shard: read sources, get or compute inversions (content-keyed cache), edit in batches, write.

Plain functions (no Prefect): :mod:`tasks.units` wraps :func:`run_shard` as a task. The shard is a short
pipeline of steps, each returning what the next one needs:

1. :func:`load_shard`: the shard's rows and the results of an earlier attempt;
2. :func:`prepare_sources`: per source image (rows grouped by :func:`tasks.planning.source_key`), read it,
   key its inversion by content, get it from the cache or compute it;
3. :func:`prepare_edits`: per-row checks, the engine's source groups (with cached PnP features);
4. :func:`edit_sources`: the engine's batched edit (it packs, reports each chunk, isolates failures);
   :func:`judge_results`: the edit-QA judge on the shard's edits (batched), the run's review gate;
5. :func:`write_jobs` + :func:`write_outputs`: assets and sidecars, first-writer-wins;
6. :func:`shard_results`: the shard's results table.

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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import pyarrow as pa
from PIL import Image

from editing.configs import PnPConfig, config_to_settings
from editing.inversion import Inversion, InversionMismatch, inversion_facts, invert, invert_many
from editing.judge import JudgeConfig, judge_edits, parse_gate
from editing.methods import (
    METHOD_OF_CONFIG,
    EditResult,
    PnPFeatures,
    SourceGroup,
    Target,
    edit,
    pnp_feature_facts,
)
from editing.model import EditModel
from manifests import edit_rows
from manifests.schema import EditRow
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
from tasks.worker import apply_thread_policy, get_model, model_lock

logger = logging.getLogger(__name__)


def _version(pkg: str) -> str:
    try:
        return version(pkg)
    except PackageNotFoundError:
        return "unknown"


VERSIONS = {p: _version(p) for p in ("editflow", "diffusers", "torch", "transformers")}
# concurrent encodes + storage requests per shard (S3 latency, not bandwidth, dominates)
WRITE_THREADS = 8
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


@dataclass(frozen=True)
class PreparedSources:
    """:func:`prepare_sources`' result: the sources in first-row order, and the seconds it spent."""

    sources: list[Source]
    seconds: dict[str, float]  # "read" (read, decode, check) and "inversion" (key, cache, invert)

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
    try:
        model.tokenize(row.source_prompt)
    except ValueError as exc:
        raise RowError(f"source_prompt: {exc}") from exc
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
    """Invert the images (one step count) sharing UNet calls, at least 4 sources per call (the
    inversion's rows, 1 and 2 per source, stay under an editing chunk's 2 per target + 1 per source);
    if that fails, one by one, so a bad source fails alone (its exception in its place). `facts`: each
    image's, from its cache look-up. A compiled UNet runs them at padded shapes (invert_many's rule)."""
    per_call = max(options.max_batch, 4)
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


def prepare_sources(
    model: EditModel, rows: list[EditRow], options: RunOptions, cache: BlobCache
) -> PreparedSources:
    """Each source of `rows` with its inversion: read, keyed, taken from the cache or computed (sources
    without one share UNet calls, per step count) and cached; or with the error that fails its rows."""
    seconds: dict[str, float] = defaultdict(float)
    sources: list[Source] = []
    missing: dict[int, list[tuple[int, Image.Image, CachedInversion]]] = {}  # steps -> to invert
    for group in group_sources(rows):
        t0 = time.perf_counter()
        try:
            data, image = read_source(model, group[0], options)
        except RowError as exc:
            sources.append(Source(group, error=str(exc)))
            continue
        seconds["read"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        found = look_up_inversion(model, group[0], data, options, cache)
        seconds["inversion"] += time.perf_counter() - t0
        source = Source(group, found.content_sha256, found.inversion_key, found.inversion,
                        cache_hit=found.inversion is not None, size=image.size)  # fmt: skip
        if found.inversion is None:
            missing.setdefault(group[0].num_steps, []).append((len(sources), image, found))
        sources.append(source)
    t0 = time.perf_counter()
    for steps, items in missing.items():
        prompts = [sources[i].rows[0].source_prompt for i, _, _ in items]
        facts = [found.facts for _, _, found in items]
        invs = invert_sources(model, [im for _, im, _ in items], prompts, steps, options, facts)
        for (i, _, found), inv in zip(items, invs):
            if isinstance(inv, Exception):
                error = f"image_uri/source_prompt: cannot invert: {type(inv).__name__}: {inv}"
                sources[i] = replace(sources[i], error=error)
                continue
            obj = keys.inversion_object_key(found.inversion_key)
            (cache.replace if found.stale else cache.put)(obj, inv.to_bytes())
            sources[i] = replace(sources[i], inversion=inv)
    if missing:
        seconds["inversion"] += time.perf_counter() - t0
    return PreparedSources(sources, dict(seconds))


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
    model: EditModel, sources: list[Source], options: RunOptions, cache: BlobCache
) -> PreparedEdits:
    """The edit groups of the sources with an inversion: each row's target prompt and settings checked
    (a bad one fails its row), and, with ``cache_features``, the source's cached PnP features attached."""
    groups: list[EditGroup] = []
    failed: dict[str, dict[str, Any]] = {}
    for src in sources:
        if src.error:
            for row in src.rows:
                failed[row.edit_id] = _result(row, "failed", error=f"row {row.row}: {src.error}")
            continue
        targets, kept = [], []
        for row in src.rows:
            try:
                model.tokenize(row.target_prompt)
                config = row.config
            except ValueError as exc:
                failed[row.edit_id] = _result(
                    row, "failed", error=f"row {row.row}: target_prompt/settings: {exc}"
                )
                continue
            targets.append(Target(row.target_prompt, config, edit_id=row.edit_id, seed=row.seed))
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
) -> list[Edited]:
    """The engine's :func:`editing.methods.edit` of all the groups (it packs them, and isolates a failing
    edit); each finished chunk's edits are reported to `progress`. Results per group, as the input."""
    on_chunk = None if progress is None else (lambda done: progress.add(done.targets))
    return edit(
        model,
        groups,
        max_batch=options.max_batch,
        record_features=options.cache_features,
        on_chunk=on_chunk,
    )


# ---------------------------------------------------------------- 4b. edit QA

# The judge's settings in every run: editing.judge's measured defaults (4 UNet evaluations per edit);
# its UNet rows per call are capped by the run's max_batch (see judge_config)
JUDGE = JudgeConfig()


def judge_config(options: RunOptions) -> JudgeConfig:
    """:data:`JUDGE` with at most as many UNet rows (and VAE images) per call as the run's own edit
    chunks can have (2 x max_batch target rows + a source row per image), so that a max_batch chosen to
    fit the device fits the judge too."""
    return replace(JUDGE, max_batch=3 * options.max_batch)


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

    def columns(self) -> dict[str, Any]:
        """The results row's ``qa_text`` and ``qa`` (null when the edit passes)."""
        return {"qa_text": self.text, "qa": "; ".join(self.reasons) or None}

    def sidecar(self) -> dict[str, Any]:
        """The sidecar's ``qa`` item (JSON: a NaN margin is written as null, its reason says why)."""
        text = self.text if self.text is not None and math.isfinite(self.text) else None
        return {"text": text, "needs_review": bool(self.reasons), "reasons": list(self.reasons),
                "gate": self.gate, "judge": self.judge, "unet_evals": self.unet_evals}  # fmt: skip


def judge_results(
    model: EditModel, groups: list[EditGroup], edited: list[Edited], options: RunOptions
) -> dict[str, EditQA]:
    """Every succeeded edit judged against its target and source prompts (editing.judge; one call, so
    the judge's UNet rows batch across the shard's edits) and checked by the run's gate `options.qa`;
    by edit id. Nothing (no cost) with ``qa="off"``. The judge reads the edited image as it is stored
    (VAE-encoded again): its gate was calibrated on images, and an edit's final latents score differently.
    A judge that fails flags the edits (not judged) and fails none."""
    gate = parse_gate(options.qa)
    done = [(row, res) for eg, results in zip(groups, edited) for row, res in zip(eg.rows, results)
            if isinstance(res, EditResult)]  # fmt: skip
    if not gate.enabled or not done:
        return {}
    config = judge_config(options)
    try:
        scores = judge_edits(
            model, [res.image for _, res in done], [row.source_prompt for row, _ in done],
            [row.target_prompt for row, _ in done], config, size_policy=options.size_policy,
        )  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - QA never fails an edit; the edits stand, flagged
        logger.warning("edit QA failed on %d edits: %s: %s", len(done), type(exc).__name__, exc)
        reason = f"not judged: {type(exc).__name__}: {exc}"
        return {row.edit_id: EditQA(None, (reason,), gate.spec, config.to_settings())
                for row, _ in done}  # fmt: skip
    return {
        row.edit_id: EditQA(
            sc.text, tuple(gate.check(sc)), gate.spec, config.to_settings(), sc.unet_evals
        )
        for (row, _), sc in zip(done, scores)
    }


def store_features(cache: BlobCache, groups: list[EditGroup], edited: list[Edited]) -> int:
    """Cache the PnP features recorded for each group that had none cached (the first PnP result's);
    returns how many entries were written."""
    written = 0
    for eg, results in zip(groups, edited):
        if not eg.features_key or eg.group.features is not None:
            continue
        for t, r in zip(eg.group.targets, results):
            if (
                isinstance(r, EditResult)
                and r.features is not None
                and METHOD_OF_CONFIG[type(t.config)] == "pnp"
            ):
                (cache.replace if eg.stale_features else cache.put)(
                    eg.features_key, r.features.to_bytes()
                )
                written += 1
                break
    return written


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
    for eg, results in zip(groups, edited):
        for row, target, res in zip(eg.rows, eg.group.targets, results):
            if isinstance(res, Exception):
                failed[row.edit_id] = _result(
                    row, "failed", error=f"row {row.row}: edit failed: {type(res).__name__}: {res}"
                )
                continue
            job = _write_job(model, run_id, eg, row, target, res, options)
            if qa and row.edit_id in qa:
                job = replace(job, qa=qa[row.edit_id])
                job.metadata["qa"] = job.qa.sidecar()
            jobs.append(job)
    return jobs, failed


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
        with model_lock(model):
            progress.stage("invert", sources=len(group_sources(todo)))
            prepared = prepare_sources(model, todo, options, cache)
            for stage, seconds in prepared.seconds.items():
                stats.seconds[stage] += seconds
            stats.inversions_computed += prepared.inversions_computed
            stats.inversion_cache_hits += prepared.cache_hits
            edits = prepare_edits(model, prepared.sources, options, cache)
            results |= edits.failed
            # rows kept from earlier and rows failed before editing are finished
            progress.set(
                len(results), failed=sum(r["status"] == "failed" for r in results.values())
            )
            if edits.groups:
                progress.stage("edit", edits=sum(len(eg.rows) for eg in edits.groups))
                t0 = time.perf_counter()
                edited = edit_sources(model, [eg.group for eg in edits.groups], options, progress)
                stats.seconds["edit"] += time.perf_counter() - t0
                progress.stage("write", edits=sum(len(eg.rows) for eg in edits.groups))
                t0 = time.perf_counter()
                qa = judge_results(model, edits.groups, edited, options)
                if qa:
                    stats.seconds["qa"] += time.perf_counter() - t0
                    stats.qa_unet_evals += sum(q.unet_evals for q in qa.values())
                t0 = time.perf_counter()
                store_features(cache, edits.groups, edited)
                jobs, failed = write_jobs(model, run_id, edits.groups, edited, options, qa)
                stats.unet_evals += sum(job.unet_evals for job in jobs)
                results |= failed | write_outputs(out, options.image_format, jobs)
                stats.seconds["write"] += time.perf_counter() - t0
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
