"""Running one shard: read sources, get or compute inversions (content-keyed cache), edit in batches, write.

Plain functions (no Prefect): :mod:`tasks.units` wraps them as tasks. A bad row (unreadable image, missing
object, invalid prompt) is recorded as failed with its row, field and reason, and the shard carries on.
A finished edit (its sidecar exists) is never redone or rewritten. Rerunning a shard keeps its earlier
succeeded rows and retries only the failed ones.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import pyarrow as pa
from PIL import Image

from editing.configs import PnPConfig, config_to_settings
from editing.inversion import Inversion, InversionMismatch, inversion_facts, invert, invert_many
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
from manifests.schema import EditRow
from manifests import edit_rows
from storage import keys
from storage.base import NotFound
from storage.cache import BlobCache, CorruptEntry
from storage.uri import open_store, read_uri
from storage.writer import encode_image, read_parquet, write_asset, write_parquet
from tasks.images import check_shape, to_rgb
from tasks.options import RunOptions
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


class RowError(Exception):
    """A problem with one manifest row, phrased for the user (row, field, reason)."""


@dataclass
class _Source:
    """One source image of the shard and the rows that edit it."""

    rows: list[EditRow]
    inversion: Inversion | None = None
    content_sha256: str = ""
    inversion_key: str = ""
    cache_hit: bool = False
    features: PnPFeatures | None = None
    features_key: str = ""
    facts: dict[str, Any] = field(default_factory=dict)
    stale_entry: bool = False  # a cached entry existed but was unusable: replace it
    stale_features: bool = False  # the same for the PnP feature cache entry
    error: str | None = None


@dataclass
class ShardStats:
    edits: int = 0
    succeeded: int = 0
    failed: int = 0
    skipped: int = 0
    inversions_computed: int = 0
    inversion_cache_hits: int = 0
    unet_evals: float = 0.0
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
            )
        }
        d["seconds"] = dict(self.seconds)
        return d


def _read_source(
    model: EditModel, src: _Source, options: RunOptions, cache: BlobCache, stats: ShardStats
) -> Image.Image | None:
    """Read the source image, key its inversion by content, and load a cached one; returns the image
    when the inversion still has to be computed."""
    row = src.rows[0]
    t0 = time.perf_counter()
    try:
        data = read_uri(row.image_uri, s3_endpoint=options.s3_endpoint)
    except NotFound:
        raise RowError(f"image_uri: no object at {row.image_uri}") from None
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
        image = to_rgb(
            image
        )  # 16-bit, float, CMYK + profile, EXIF orientation, alpha: see tasks.images
        check_shape(image.width, image.height)
    except Exception as exc:  # noqa: BLE001 - an image that decodes but cannot be edited is this row's problem
        raise RowError(f"image_uri: {row.image_uri}: {type(exc).__name__}: {exc}") from exc
    try:
        model.tokenize(row.source_prompt)
    except ValueError as exc:
        raise RowError(f"source_prompt: {exc}") from exc
    stats.seconds["read"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    src.content_sha256 = keys.sha256_hex(data)
    src.facts = inversion_facts(
        model,
        row.source_prompt,
        num_steps=row.num_steps,
        guidance_scale=options.inversion_guidance,
        size_policy=options.size_policy,
    )
    src.inversion_key = keys.inversion_key(src.content_sha256, src.facts)
    obj = keys.inversion_object_key(src.inversion_key)
    try:
        blob = cache.get(obj)
    except CorruptEntry as exc:
        logger.warning("%s; recomputing it", exc)
        blob, src.stale_entry = None, True
    if blob is not None:
        try:
            inv = Inversion.from_bytes(blob, expect=src.facts)
            _check_finite_tensors(inv.latents, inv.corrections, inv.cond, inv.uncond)
            src.inversion = inv
            src.cache_hit = True
            stats.inversion_cache_hits += 1
        except InversionMismatch as exc:
            logger.warning("inversion cache entry %s is unusable (%s); recomputing it", obj, exc)
            src.stale_entry = True
    stats.seconds["inversion"] += time.perf_counter() - t0
    return None if src.cache_hit else image


def _check_finite_tensors(*tensors) -> None:
    """``InversionMismatch`` when a cached tensor holds NaN/inf (such an entry must be recomputed)."""
    import torch

    for t in tensors:
        if not torch.isfinite(t).all():
            raise InversionMismatch("entry holds non-finite values (NaN/inf)")


def _invert_missing(
    model: EditModel,
    todo: list[tuple[_Source, Image.Image]],
    options: RunOptions,
    cache: BlobCache,
    stats: ShardStats,
) -> None:
    """Invert every source without a cached inversion, sharing UNet calls, and cache the results."""
    t0 = time.perf_counter()
    by_steps: dict[int, list[tuple[_Source, Image.Image]]] = {}
    for src, image in todo:
        by_steps.setdefault(src.rows[0].num_steps, []).append((src, image))
    for steps, items in by_steps.items():
        try:
            invs = invert_many(
                model, [im for _, im in items], [s.rows[0].source_prompt for s, _ in items], num_steps=steps,
                guidance_scale=options.inversion_guidance, size_policy=options.size_policy, max_batch=options.max_batch,
            )  # fmt: skip
        except Exception:  # noqa: BLE001 - find the one that fails
            invs = []
            for src, image in items:
                try:
                    invs.append(invert(model, image, src.rows[0].source_prompt, num_steps=steps,
                                       guidance_scale=options.inversion_guidance, size_policy=options.size_policy))  # fmt: skip
                except Exception as exc:  # noqa: BLE001
                    invs.append(exc)
        for (src, _), inv in zip(items, invs):
            if isinstance(inv, Exception):
                src.error = f"image_uri/source_prompt: cannot invert: {type(inv).__name__}: {inv}"
                continue
            src.inversion = inv
            obj = keys.inversion_object_key(src.inversion_key)
            (cache.replace if src.stale_entry else cache.put)(obj, inv.to_bytes())
            stats.inversions_computed += 1
    stats.seconds["inversion"] += time.perf_counter() - t0


def _feature_cache_key(model: EditModel, src: _Source, config: PnPConfig) -> str:
    facts = pnp_feature_facts(model, src.inversion, config)
    return keys.features_object_key(
        src.inversion_key,
        keys.digest({k: v for k, v in facts.items() if k != "inversion"}, length=16),
    )


def _edit_with_fallback(
    model: EditModel, groups: list[SourceGroup], options: RunOptions
) -> list[list[EditResult | Exception]]:
    """Edit everything in shared batches; if that fails, per source, then per target, so one bad edit
    fails alone."""
    try:
        return edit(
            model, groups, max_batch=options.max_batch, record_features=options.cache_features
        )
    except Exception as exc:  # noqa: BLE001
        if len(groups) == 1 and len(groups[0].targets) == 1:
            return [[exc]]
        logger.warning(
            "batched edit failed (%s: %s); retrying per source and target", type(exc).__name__, exc
        )
    out: list[list[EditResult | Exception]] = []
    for g in groups:
        try:
            out.append(
                edit(
                    model, [g], max_batch=options.max_batch, record_features=options.cache_features
                )[0]
            )
        except Exception:  # noqa: BLE001
            per = []
            for t in g.targets:
                try:
                    per.append(
                        edit(model, [SourceGroup(g.inversion, [t], g.features)], max_batch=1)[0][0]
                    )
                except Exception as exc:  # noqa: BLE001
                    per.append(exc)
            out.append(per)
    return out


def _edit_in_waves(
    model: EditModel, groups: list[SourceGroup], options: RunOptions, progress: ShardProgress | None
) -> list[list[EditResult | Exception]]:
    """:func:`_edit_with_fallback` one wave at a time (at most `max_batch` targets of one method, the
    engine's own batch), reporting each wave's edits to `progress`; results per group, as the input."""
    out: list[list[EditResult | Exception | None]] = [[None] * len(g.targets) for g in groups]
    for wave in _waves(groups, options.max_batch):
        sub = [
            SourceGroup(
                groups[gi].inversion, [groups[gi].targets[ti] for ti in tis], groups[gi].features
            )
            for gi, tis in wave
        ]
        for (gi, tis), res in zip(wave, _edit_with_fallback(model, sub, options)):
            for ti, r in zip(tis, res):
                out[gi][ti] = r
        if progress is not None:
            progress.add(sum(len(tis) for _, tis in wave))
    return out  # type: ignore[return-value]


def _waves(groups: list[SourceGroup], max_batch: int) -> list[list[tuple[int, list[int]]]]:
    """The groups' targets packed, per method and in order, into waves of at most `max_batch`:
    each wave a list of (group index, target indices)."""
    waves: list[list[tuple[int, list[int]]]] = []
    for method in dict.fromkeys(METHOD_OF_CONFIG.values()):
        wave: list[tuple[int, list[int]]] = []
        used = 0
        for gi, g in enumerate(groups):
            idxs = [
                ti
                for ti, t in enumerate(g.targets)
                if METHOD_OF_CONFIG.get(type(t.config)) == method
            ]
            while idxs:
                take, idxs = idxs[: max_batch - used], idxs[max_batch - used :]
                wave.append((gi, take))
                used += len(take)
                if used == max_batch:
                    waves.append(wave)
                    wave, used = [], 0
        if wave:
            waves.append(wave)
    return waves


def _metadata(
    row: EditRow,
    src: _Source,
    res: EditResult,
    model: EditModel,
    config,
    unet_evals: float,
    seconds: float,
    run_id: str,
) -> dict[str, Any]:
    return {
        "edit_id": row.edit_id,
        "run_id": run_id,
        "row": row.row,
        "source_uri": row.image_uri,
        "source_sha256": src.content_sha256,
        "source_prompt": row.source_prompt,
        "target_prompt": row.target_prompt,
        "method": row.method,
        "settings": config_to_settings(config),
        "seed": row.seed,
        "num_steps": row.num_steps,
        "model_id": model.model_id,
        "model_revision": model.revision,
        "inversion_key": src.inversion_key,
        "inversion_cache_hit": src.cache_hit,
        "features_cache_hit": src.features is not None and row.method == "pnp",
        "unet_evals": unet_evals,
        "unet_evals_detail": dict(res.unet_evals),
        "seconds": seconds,
        "size": list(res.image.size),
        "versions": VERSIONS,
        "passthrough": row.passthrough,
    }


def run_shard(options: RunOptions, run_id: str, shard_index: int) -> dict[str, Any]:
    """Run (or finish) one planned shard; write its results Parquet; return its stats."""
    t_start = time.perf_counter()
    out = open_store(options.out, s3_endpoint=options.s3_endpoint)
    cache = BlobCache(open_store(options.cache_uri, s3_endpoint=options.s3_endpoint))
    table = read_parquet(out, keys.shard_plan_key(run_id, shard_index))
    rows = list(edit_rows(table))
    res_key = keys.shard_results_key(run_id, shard_index)
    previous: dict[str, dict[str, Any]] = {}
    if out.exists(res_key):
        previous = {r["edit_id"]: r for r in read_parquet(out, res_key).to_pylist()}
    stats = ShardStats(edits=len(rows))
    results: dict[str, dict[str, Any]] = {}
    todo = []
    for row in rows:
        prev = previous.get(row.edit_id)
        if prev is not None and prev["status"] in ("succeeded", "skipped"):
            results[row.edit_id] = prev
        else:  # planning left out finished edits; a race or an earlier crash is caught at write time
            todo.append(row)
    progress = ShardProgress(
        run_id, shard_index, len(rows)
    )  # finished edits, published per batch (tasks.progress)
    progress.set(len(results))
    threads = None
    if todo:
        threads = apply_thread_policy(
            options.threads
        )  # once per worker process: its share of the CPUs
        model = get_model(
            options.model_ref,
            device=options.device,
            dtype=options.dtype,
            allow_pickle=options.allow_pickle,
        )
        with model_lock(model):
            _run_rows(model, todo, options, run_id, out, cache, stats, results, progress)
    for r in results.values():
        stats.succeeded += r["status"] == "succeeded"
        stats.failed += r["status"] == "failed"
        stats.skipped += r["status"] == "skipped"
    t0 = time.perf_counter()
    write_parquet(out, res_key, results_table([results[r.edit_id] for r in rows], table))
    stats.seconds["write"] += time.perf_counter() - t0
    stats.seconds["total"] = time.perf_counter() - t_start
    logger.info("shard %d: %s", shard_index, stats.to_dict())
    return {"shard": shard_index, **stats.to_dict(), "threads": threads}


def _result(row: EditRow, status: str, **kw: Any) -> dict[str, Any]:
    return {"edit_id": row.edit_id, "status": status, "output_uri": None, "metadata_uri": None, "error": None,
            "cache_hit": None, "unet_evals": None, "seconds": None} | kw  # fmt: skip


def _run_rows(
    model: EditModel, todo: list[EditRow], options: RunOptions, run_id: str, out, cache: BlobCache, stats: ShardStats, results: dict,
    progress: ShardProgress | None = None,
) -> None:  # fmt: skip
    # 1. Sources: read each image once, get or compute its inversion
    sources: dict[tuple, _Source] = {}
    for row in todo:
        sources.setdefault(
            (row.image_uri, row.source_prompt, row.num_steps), _Source(rows=[])
        ).rows.append(row)
    missing = []
    for src in sources.values():
        try:
            image = _read_source(model, src, options, cache, stats)
        except RowError as exc:
            src.error = str(exc)
            continue
        if image is not None:
            missing.append((src, image))
    if missing:
        _invert_missing(model, missing, options, cache, stats)
    # 2. Targets: per-row checks, then one batched edit over every source of the shard
    groups: list[SourceGroup] = []
    owners: list[tuple[_Source, list[EditRow]]] = []
    for src in sources.values():
        if src.error:
            for row in src.rows:
                results[row.edit_id] = _result(row, "failed", error=f"row {row.row}: {src.error}")
            continue
        targets, kept = [], []
        for row in src.rows:
            try:
                model.tokenize(row.target_prompt)
                config = row.config
            except ValueError as exc:
                results[row.edit_id] = _result(
                    row, "failed", error=f"row {row.row}: target_prompt/settings: {exc}"
                )
                continue
            targets.append(Target(row.target_prompt, config, edit_id=row.edit_id, seed=row.seed))
            kept.append(row)
        if not targets:
            continue
        if options.cache_features:
            _attach_features(model, src, targets, cache)
        groups.append(SourceGroup(src.inversion, targets, src.features))
        owners.append((src, kept))
    if progress is not None:  # rows kept from earlier and rows failed before editing are finished
        progress.set(len(results), failed=sum(r["status"] == "failed" for r in results.values()))
    if not groups:
        return
    t0 = time.perf_counter()
    edited = _edit_in_waves(model, groups, options, progress)
    stats.seconds["edit"] += time.perf_counter() - t0
    # 3. Write assets and sidecars (encoding and storage requests overlap in a small thread pool)
    t0 = time.perf_counter()
    jobs = []
    for (src, kept), group, res_list in zip(owners, groups, edited):
        inv_share = (src.inversion.unet_evals if not src.cache_hit else 0) / len(kept)
        if options.cache_features and src.features is None:
            _store_features(model, src, group, res_list, cache)
        for row, target, res in zip(kept, group.targets, res_list):
            if isinstance(res, Exception):
                results[row.edit_id] = _result(
                    row, "failed", error=f"row {row.row}: edit failed: {type(res).__name__}: {res}"
                )
                continue
            evals = inv_share + res.unet_evals["source"] + res.unet_evals["target"]
            stats.unet_evals += evals
            seconds = res.seconds + src.inversion.seconds / len(kept) * (not src.cache_hit)
            meta = _metadata(row, src, res, model, target.config, evals, seconds, run_id)
            jobs.append((row, res.image, meta, src.cache_hit, evals, seconds))
    with ThreadPoolExecutor(max_workers=WRITE_THREADS) as pool:
        for row, outcome in zip(
            [j[0] for j in jobs], pool.map(lambda j: _write_one(out, options, j), jobs)
        ):
            results[row.edit_id] = outcome
    stats.seconds["write"] += time.perf_counter() - t0


WRITE_THREADS = (
    8  # concurrent encodes + storage requests per shard (S3 latency, not bandwidth, dominates)
)


def _write_one(out, options: RunOptions, job: tuple) -> dict[str, Any]:
    """Encode one edit (PNG text chunk with the essentials) and write it and its sidecar, first-writer-wins."""
    row, image, meta, cache_hit, evals, seconds = job
    essentials = {
        k: meta[k]
        for k in (
            "edit_id",
            "source_prompt",
            "target_prompt",
            "method",
            "settings",
            "seed",
            "model_id",
            "model_revision",
            "source_sha256",
        )
    }
    try:
        data = encode_image(
            image, options.image_format, {"editflow": json.dumps(essentials, sort_keys=True)}
        )
        asset_uri, sidecar_uri, written = write_asset(
            out, row.edit_id, data, options.image_format, meta
        )
    except Exception as exc:  # noqa: BLE001 - a storage failure of one edit fails that edit
        return _result(
            row,
            "failed",
            error=f"row {row.row}: writing output failed: {type(exc).__name__}: {exc}",
        )
    return _result(
        row, "succeeded" if written else "skipped", output_uri=asset_uri, metadata_uri=sidecar_uri, cache_hit=cache_hit,
        unet_evals=evals, seconds=seconds, error=None if written else "finished earlier or by another worker",
    )  # fmt: skip


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


def _attach_features(
    model: EditModel, src: _Source, targets: list[Target], cache: BlobCache
) -> None:
    config = _pnp_config_of(targets)
    if config is None:
        return
    src.features_key = _feature_cache_key(model, src, config)
    try:
        blob = cache.get(src.features_key)
    except CorruptEntry as exc:
        logger.warning("%s; recomputing it", exc)
        blob, src.stale_features = None, True
    if blob is None:
        return
    try:
        features = PnPFeatures.from_bytes(
            blob, expect={"inversion": pnp_feature_facts(model, src.inversion, config)["inversion"]}
        )
        _check_finite_tensors(*features.tensors.values())
        src.features = features
    except ValueError as exc:
        logger.warning(
            "feature cache entry %s is unusable (%s); recomputing it", src.features_key, exc
        )
        src.stale_features = True


def _store_features(
    model: EditModel, src: _Source, group: SourceGroup, res_list: list, cache: BlobCache
) -> None:
    if not src.features_key:
        return
    for t, r in zip(group.targets, res_list):
        if (
            isinstance(r, EditResult)
            and r.features is not None
            and METHOD_OF_CONFIG[type(t.config)] == "pnp"
        ):
            (cache.replace if src.stale_features else cache.put)(
                src.features_key, r.features.to_bytes()
            )
            return


def read_run_results(options: RunOptions, run_id: str) -> pa.Table:
    """All results files of a run concatenated (skipped rows included)."""
    out = open_store(options.out, s3_endpoint=options.s3_endpoint)
    tables = [
        read_parquet(out, k)
        for k in sorted(out.list(keys.run_prefix(run_id) + "results/"))
        if k.endswith(".parquet")
    ]
    if not tables:
        return pa.table({})
    return pa.concat_tables(tables, promote_options="permissive")


__all__ = ["run_shard", "read_run_results", "RowError"]
