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
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import pyarrow as pa
from PIL import Image

from editing.configs import PnPConfig, config_to_settings
from editing.inversion import Inversion, InversionMismatch, inversion_facts, invert
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
from manifests.validate import edit_rows
from storage import keys
from storage.base import NotFound
from storage.cache import BlobCache
from storage.uri import open_store, read_uri
from storage.writer import encode_image, read_parquet, write_asset, write_parquet
from tasks.options import RunOptions
from tasks.results import results_table
from tasks.worker import get_model, model_lock

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
        d = {k: getattr(self, k) for k in ("edits", "succeeded", "failed", "skipped", "inversions_computed", "inversion_cache_hits", "unet_evals")}
        d["seconds"] = dict(self.seconds)
        return d


def _load_inversion(model: EditModel, src: _Source, row: EditRow, options: RunOptions, cache: BlobCache, stats: ShardStats) -> None:
    t0 = time.perf_counter()
    try:
        data = read_uri(row.image_uri, s3_endpoint=options.s3_endpoint)
    except NotFound:
        raise RowError(f"image_uri: no object at {row.image_uri}") from None
    except Exception as exc:  # noqa: BLE001 - any read failure is this row's problem, with its reason
        raise RowError(f"image_uri: could not read {row.image_uri}: {type(exc).__name__}: {exc}") from exc
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as exc:  # noqa: BLE001
        raise RowError(f"image_uri: {row.image_uri} is not a readable image ({type(exc).__name__}: {exc})") from exc
    stats.seconds["read"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    src.content_sha256 = keys.sha256_hex(data)
    facts = inversion_facts(
        model, row.source_prompt, num_steps=row.num_steps, guidance_scale=options.inversion_guidance, size_policy=options.size_policy
    )
    src.inversion_key = keys.inversion_key(src.content_sha256, facts)
    obj = keys.inversion_object_key(src.inversion_key)
    blob = cache.get(obj)
    if blob is not None:
        try:
            src.inversion = Inversion.from_bytes(blob, expect=facts)
            src.cache_hit = True
        except InversionMismatch as exc:
            logger.warning("inversion cache entry %s is unusable (%s); recomputing it", obj, exc)
    if src.inversion is None:
        try:
            model.tokenize(row.source_prompt)
            src.inversion = invert(
                model, image, row.source_prompt, num_steps=row.num_steps,
                guidance_scale=options.inversion_guidance, size_policy=options.size_policy,
            )  # fmt: skip
        except ValueError as exc:
            raise RowError(f"source_prompt/image: cannot invert: {exc}") from exc
        if blob is not None:
            cache.replace(obj, src.inversion.to_bytes())
        else:
            cache.put(obj, src.inversion.to_bytes())
        stats.inversions_computed += 1
    else:
        stats.inversion_cache_hits += 1
    stats.seconds["inversion"] += time.perf_counter() - t0


def _feature_cache_key(model: EditModel, src: _Source, config: PnPConfig) -> str:
    facts = pnp_feature_facts(model, src.inversion, config)
    return keys.features_object_key(src.inversion_key, keys.digest({k: v for k, v in facts.items() if k != "inversion"}, length=16))


def _edit_with_fallback(model: EditModel, groups: list[SourceGroup], options: RunOptions) -> list[list[EditResult | Exception]]:
    """Edit everything in shared batches; if that fails, per source, then per target, so one bad edit
    fails alone."""
    try:
        return edit(model, groups, max_batch=options.max_batch, record_features=options.cache_features)
    except Exception as exc:  # noqa: BLE001
        if len(groups) == 1 and len(groups[0].targets) == 1:
            return [[exc]]
        logger.warning("batched edit failed (%s: %s); retrying per source and target", type(exc).__name__, exc)
    out: list[list[EditResult | Exception]] = []
    for g in groups:
        try:
            out.append(edit(model, [g], max_batch=options.max_batch, record_features=options.cache_features)[0])
        except Exception:  # noqa: BLE001
            per = []
            for t in g.targets:
                try:
                    per.append(edit(model, [SourceGroup(g.inversion, [t], g.features)], max_batch=1)[0][0])
                except Exception as exc:  # noqa: BLE001
                    per.append(exc)
            out.append(per)
    return out


def _metadata(row: EditRow, src: _Source, res: EditResult, model: EditModel, config, unet_evals: float, seconds: float, run_id: str) -> dict[str, Any]:
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
        elif out.exists(keys.sidecar_key(row.edit_id)):
            results[row.edit_id] = _result(row, "skipped", error="finished earlier", metadata_uri=out.uri(keys.sidecar_key(row.edit_id)))
        else:
            todo.append(row)
    if todo:
        model = get_model(options.model_ref, device=options.device, dtype=options.dtype, allow_pickle=options.allow_pickle)
        with model_lock(model):
            _run_rows(model, todo, options, run_id, out, cache, stats, results)
    for r in results.values():
        stats.succeeded += r["status"] == "succeeded"
        stats.failed += r["status"] == "failed"
        stats.skipped += r["status"] == "skipped"
    t0 = time.perf_counter()
    write_parquet(out, res_key, results_table([results[r.edit_id] for r in rows], table))
    stats.seconds["write"] += time.perf_counter() - t0
    stats.seconds["total"] = time.perf_counter() - t_start
    logger.info("shard %d: %s", shard_index, stats.to_dict())
    return {"shard": shard_index, **stats.to_dict()}


def _result(row: EditRow, status: str, **kw: Any) -> dict[str, Any]:
    return {"edit_id": row.edit_id, "status": status, "output_uri": None, "metadata_uri": None, "error": None,
            "cache_hit": None, "unet_evals": None, "seconds": None} | kw  # fmt: skip


def _run_rows(model: EditModel, todo: list[EditRow], options: RunOptions, run_id: str, out, cache: BlobCache, stats: ShardStats, results: dict) -> None:
    # 1. Sources: read each image once, get or compute its inversion
    sources: dict[tuple, _Source] = {}
    for row in todo:
        sources.setdefault((row.image_uri, row.source_prompt, row.num_steps), _Source(rows=[])).rows.append(row)
    for src in sources.values():
        try:
            _load_inversion(model, src, src.rows[0], options, cache, stats)
        except RowError as exc:
            src.error = str(exc)
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
                config = row.config()
            except ValueError as exc:
                results[row.edit_id] = _result(row, "failed", error=f"row {row.row}: target_prompt/settings: {exc}")
                continue
            targets.append(Target(row.target_prompt, config, edit_id=row.edit_id, seed=row.seed))
            kept.append(row)
        if not targets:
            continue
        if options.cache_features:
            _attach_features(model, src, targets, cache)
        groups.append(SourceGroup(src.inversion, targets, src.features))
        owners.append((src, kept))
    if not groups:
        return
    t0 = time.perf_counter()
    edited = _edit_with_fallback(model, groups, options)
    stats.seconds["edit"] += time.perf_counter() - t0
    # 3. Write assets and sidecars
    t0 = time.perf_counter()
    for (src, kept), group, res_list in zip(owners, groups, edited):
        inv_share = (src.inversion.unet_evals if not src.cache_hit else 0) / len(kept)
        if options.cache_features and src.features is None:
            _store_features(model, src, group, res_list, cache)
        for row, target, res in zip(kept, group.targets, res_list):
            if isinstance(res, Exception):
                results[row.edit_id] = _result(row, "failed", error=f"row {row.row}: edit failed: {type(res).__name__}: {res}")
                continue
            evals = inv_share + res.unet_evals["source"] + res.unet_evals["target"]
            stats.unet_evals += evals
            seconds = res.seconds + src.inversion.seconds / len(kept) * (not src.cache_hit)
            meta = _metadata(row, src, res, model, target.config, evals, seconds, run_id)
            essentials = {k: meta[k] for k in ("edit_id", "source_prompt", "target_prompt", "method", "settings", "seed", "model_id", "model_revision", "source_sha256")}
            data = encode_image(res.image, options.image_format, {"editflow": json.dumps(essentials, sort_keys=True)})
            try:
                asset_uri, sidecar_uri, written = write_asset(out, row.edit_id, data, options.image_format, meta)
            except Exception as exc:  # noqa: BLE001 - a storage failure of one edit fails that edit
                results[row.edit_id] = _result(row, "failed", error=f"row {row.row}: writing output failed: {type(exc).__name__}: {exc}")
                continue
            status = "succeeded" if written else "skipped"
            results[row.edit_id] = _result(
                row, status, output_uri=asset_uri, metadata_uri=sidecar_uri, cache_hit=src.cache_hit,
                unet_evals=evals, seconds=seconds, error=None if written else "finished by another worker",
            )  # fmt: skip
    stats.seconds["write"] += time.perf_counter() - t0


def _pnp_config_of(targets: list[Target]) -> PnPConfig | None:
    """The one PnP config whose features a group can share (None if mixed or no PnP targets)."""
    cfgs = {(t.config.feature_layers, t.config.attn_layers, t.config.feature_t, t.config.attn_t) for t in targets if isinstance(t.config, PnPConfig)}
    if len(cfgs) != 1:
        return None
    return next(t.config for t in targets if isinstance(t.config, PnPConfig))


def _attach_features(model: EditModel, src: _Source, targets: list[Target], cache: BlobCache) -> None:
    config = _pnp_config_of(targets)
    if config is None:
        return
    src.features_key = _feature_cache_key(model, src, config)
    blob = cache.get(src.features_key)
    if blob is None:
        return
    try:
        src.features = PnPFeatures.from_bytes(blob, expect={"inversion": pnp_feature_facts(model, src.inversion, config)["inversion"]})
    except ValueError as exc:
        logger.warning("feature cache entry %s is unusable (%s); recomputing it", src.features_key, exc)


def _store_features(model: EditModel, src: _Source, group: SourceGroup, res_list: list, cache: BlobCache) -> None:
    if not src.features_key:
        return
    for t, r in zip(group.targets, res_list):
        if isinstance(r, EditResult) and r.features is not None and METHOD_OF_CONFIG[type(t.config)] == "pnp":
            cache.put(src.features_key, r.features.to_bytes())
            return


def read_run_results(options: RunOptions, run_id: str) -> pa.Table:
    """All results files of a run concatenated (skipped rows included)."""
    out = open_store(options.out, s3_endpoint=options.s3_endpoint)
    tables = [read_parquet(out, k) for k in sorted(out.list(keys.run_prefix(run_id) + "results/")) if k.endswith(".parquet")]
    if not tables:
        return pa.table({})
    return pa.concat_tables(tables, promote_options="permissive")


__all__ = ["run_shard", "read_run_results", "RowError"]
