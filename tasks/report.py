"""The run report: ``runs/{run_id}/report.html`` (one self-contained page) and ``contact_sheet.png``.

Plain functions: they read a run's files (plan, summary, results, shard plans, sidecars) through an
:class:`~storage.base.ObjectStore` and write through :mod:`storage.writer`; :mod:`tasks.units` wraps
:func:`write_report` as a Prefect task. Also :func:`run_overview` / :func:`format_overview` behind
``editflow show`` and :func:`resolve_run` (a run's URI or its id with ``--out``).

Thumbnails are embedded as ``data:`` URIs, for local and S3 outputs alike: the page opens anywhere (a
laptop, a CI artefact, an e-mail attachment) without credentials and without expiring, which presigned
URLs would. To stay small for 100k-edit runs the page shows an evenly spread sample of sources (every
source when there are few) and lists every failure: the first :data:`FAILURES_IN_PAGE` in the page and
all of them in ``failures.csv`` next to it.
"""

from __future__ import annotations

import base64
import csv
import datetime as dt
import html
import io
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, ImageDraw, ImageFont

from editing.configs import METHOD_CONFIGS, config_to_settings
from manifests.schema import DEFAULT_NUM_STEPS, DEFAULT_SEED, default_guidance
from storage import keys
from storage.base import NotFound, ObjectStore
from storage.uri import open_store, read_uri, split_uri
from storage.writer import png_bytes, read_json, read_parquet, write_json
from tasks.errors import RunDamaged
from tasks.planning import read_shard_plan
from tasks.results import needs_review

logger = logging.getLogger(__name__)

REPORT_NAME = keys.REPORT_NAME  # the page links the files next to it by these names
CONTACT_SHEET_NAME = keys.CONTACT_SHEET_NAME
FAILURES_NAME = keys.FAILURES_NAME
MAX_SOURCES = 30  # sources shown in the page (an evenly spread sample beyond that)
MAX_EDITS_PER_SOURCE = 12  # edits shown per source (the rest counted)
SHEET_SOURCES = 12  # rows of the contact sheet
SHEET_EDITS = 8  # edit columns of the contact sheet
FAILURES_IN_PAGE = 1000  # failures listed in the page; failures.csv always holds all of them
THUMB = 160  # longest thumbnail side in pixels (images are only shrunk, never enlarged)
READ_THREADS = 8  # concurrent object reads (S3 latency dominates)
_STAGES = (
    "validate",
    "plan",
    "shards_read",
    "shards_inversion",
    "shards_edit",
    "shards_write",
    "shards_total",
    "wall",
)


# ----------------------------------------------------------------------------- locating a run


def resolve_run(ref: str, out: str | None = None) -> tuple[str, str]:
    """``(out_uri, run_id)`` from a run id plus `out`, or from the run's URI (``out/demo/runs/RUN_ID``,
    ``s3://bucket/prefix/runs/RUN_ID``, with or without a trailing '/')."""
    text = ref.rstrip("/")
    found = keys.split_run_ref(text)
    if found is not None and found[0] is not None:
        head, run_id = found
        if out and _norm(out) != _norm(head):
            raise ValueError(f"{ref!r} is a run of {head!r}, not of --out {out!r}")
        return head, keys.check_id(run_id, what="run_id")
    if found is not None:  # 'runs/RUN_ID' relative to the working dir
        return out or ".", keys.check_id(found[1], what="run_id")
    if not out:
        raise ValueError(
            f"{ref!r} is not a run URI ('.../runs/RUN_ID'); give the run id with --out URI"
        )
    return out, keys.check_id(text, what="run_id")


def _norm(uri: str) -> tuple[str, str, str]:
    scheme, bucket, path = split_uri(uri)
    return scheme, bucket, path.rstrip("/")


# ----------------------------------------------------------------------------- reading a run


@dataclass
class RunFiles:
    """What a run has written so far."""

    run_id: str
    plan: dict[str, Any]
    summary: dict[str, Any] | None  # None: the run was interrupted (or is still running)
    results: pa.Table  # every results file present, with a ``_file`` column naming its file
    result_files: list[str] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.summary is not None

    @property
    def shards_with_results(self) -> int:
        return sum(1 for k in self.result_files if keys.is_shard_results_file(k))


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_plan(plan: Any, where: str, run_id: str) -> dict[str, Any]:
    """`plan` (read from `where`) when it has the shape planning writes: a placeholder (planning was
    interrupted), or options with a known image format and shards with distinct non-negative indices
    and counts. Else ``RunDamaged`` naming the field: a plan is as untrusted as anything under --out."""

    def damaged(field: str, problem: str) -> RunDamaged:
        return RunDamaged(
            f"run {run_id}: {where} is damaged: {field} {problem}; it cannot be shown or rerun, start a new run"
        )

    if not isinstance(plan, dict):
        raise damaged("the plan", f"is a JSON {type(plan).__name__}, not an object")
    if "shards" not in plan and "options" not in plan:
        return plan  # the placeholder that claims the run id while planning
    options, shards = plan.get("options"), plan.get("shards")
    if not isinstance(options, dict):
        raise damaged("options", "is not an object")
    if options.get("image_format", keys.IMAGE_FORMATS[0]) not in keys.IMAGE_FORMATS:
        fmt = str(options["image_format"])[:80]
        raise damaged("options.image_format", f"is {fmt!r}, not one of {keys.IMAGE_FORMATS}")
    if not isinstance(shards, list):
        raise damaged("shards", "is not a list")
    if not _is_count(plan.get("rows", 0)):
        raise damaged("rows", f"is {str(plan['rows'])[:80]!r}, not a count")
    seen: set[int] = set()
    for i, shard in enumerate(shards):
        if not isinstance(shard, dict):
            raise damaged(f"shards[{i}]", "is not an object")
        index = shard.get("index")
        if not _is_count(index) or index in seen:
            raise damaged(
                f"shards[{i}].index", f"is {str(index)[:80]!r}, not a new non-negative integer"
            )
        seen.add(index)
        if not _is_count(shard.get("edits", 0)):
            raise damaged(f"shards[{i}].edits", f"is {str(shard['edits'])[:80]!r}, not a count")
    return plan


def read_run_plan_json(store: ObjectStore, run_id: str) -> dict[str, Any]:
    """The plan of `run_id`, checked (:func:`check_plan`); ``NotFound`` without one, ``RunDamaged`` for
    a plan that does not parse or is damaged."""
    key = keys.plan_key(run_id)
    try:
        plan = read_json(store, key)
    except NotFound:
        raise
    except (ValueError, RecursionError) as exc:  # not JSON (read_json names the object), too deep
        why = str(exc) if isinstance(exc, ValueError) else f"{store.uri(key)} is nested too deeply"
        raise RunDamaged(
            f"run {run_id}: {why}; it cannot be shown or rerun, start a new run"
        ) from None
    return check_plan(plan, store.uri(key), run_id)


def load_run(store: ObjectStore, run_id: str) -> RunFiles:
    """Read the plan, the summary (if any) and every results file of `run_id`; ``NotFound`` without a plan,
    ``RunDamaged`` for a damaged one."""
    plan = read_run_plan_json(store, run_id)
    summary = (
        read_json(store, keys.summary_key(run_id))
        if store.exists(keys.summary_key(run_id))
        else None
    )
    files = [
        k for k in store.list(keys.run_results_prefix(run_id)) if keys.is_results_file(run_id, k)
    ]
    with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
        tables = list(pool.map(lambda k: read_parquet(store, k), files))
    tagged = [
        t.append_column("_file", pa.array([k] * t.num_rows, pa.string()))
        for k, t in zip(files, tables)
        if t.num_rows
    ]
    results = (
        pa.concat_tables(tagged, promote_options="permissive")
        if tagged
        else pa.table({"_file": pa.array([], pa.string())})
    )
    return RunFiles(run_id, plan, summary, results, files)


def _counts(results: pa.Table) -> dict[str, int]:
    counts = {s: 0 for s in ("succeeded", "failed", "skipped")}
    if results.num_rows and "status" in results.column_names:
        for s in counts:
            counts[s] = int(pc.sum(pc.equal(results.column("status"), s)).as_py() or 0)
    return counts


def failures(results: pa.Table) -> list[dict[str, Any]]:
    """Every failed row as ``{"row", "edit_id", "reason"}``, in manifest order."""
    if not results.num_rows or "status" not in results.column_names:
        return []
    failed = results.filter(pc.equal(results.column("status"), "failed"))
    if "row" in failed.column_names:
        failed = failed.sort_by("row")
    rows = failed.select(
        [c for c in ("row", "edit_id", "error") if c in failed.column_names]
    ).to_pylist()
    return [
        {"row": r.get("row"), "edit_id": r["edit_id"], "reason": r.get("error") or ""} for r in rows
    ]


def run_overview(store: ObjectStore, run_id: str) -> dict[str, Any]:
    """What ``editflow show`` prints: state, counts, totals, failures and the report's location."""
    run = load_run(store, run_id)
    plan, summary = run.plan, run.summary
    counts = _counts(run.results)
    shards = len(plan.get("shards", []))
    info: dict[str, Any] = {
        "run_id": run_id,
        "out": store.uri(),
        "state": "finished" if run.finished else "interrupted",
        "rows": plan.get("rows", 0),
        "counts": dict(summary["counts"]) if summary else counts,
        "shards": shards,
        "shards_with_results": run.shards_with_results,
        "not_finished": max(
            0, plan.get("rows", 0) - run.results.num_rows
        ),  # rows without a result yet
        "failures": failures(run.results),
        "needs_review": needs_review(run.results),
        "summary": summary,
    }
    report = keys.report_key(run_id)
    info["report_uri"] = store.uri(report) if store.exists(report) else None
    return info


def format_overview(
    info: dict[str, Any], *, limit: int = 50, s3_endpoint: str | None = None
) -> str:
    """The text of ``editflow show``: the summary, up to `limit` failures (0: all), the report's location;
    its rerun hints are full commands (with `s3_endpoint` when the run was reached through one)."""
    import shlex

    run = f"{info['out'].rstrip('/')}/runs/{info['run_id']}"
    rerun = f"editflow rerun {run}" + (
        f" --s3-endpoint {shlex.quote(s3_endpoint)}" if s3_endpoint else ""
    )
    c = info["counts"]
    lines = []
    if info["state"] == "finished":
        lines.append(
            f"run {info['run_id']} (finished): {c['succeeded']} succeeded, {c['failed']} failed, {c['skipped']} skipped (of {info['rows']})"
        )
    else:
        lines.append(
            f"run {info['run_id']} (interrupted: {info['shards_with_results']} of {info['shards']} shards have results): "
            f"{c['succeeded']} succeeded, {c['failed']} failed, {c['skipped']} skipped, {info['not_finished']} not run (of {info['rows']})"
        )
    s = info.get("summary")
    if s:
        lines.append(
            f"inversions: {s.get('inversions_computed', 0)} computed, {s.get('inversion_cache_hits', 0)} from cache; UNet evaluations: {s.get('unet_evals', 0):.0f}"
        )
        secs = s.get("seconds", {})
        if "wall" in secs:
            lines.append(
                f"time: {secs['wall']:.1f}s; {_per_hour(c.get('succeeded', 0), secs['wall'])}"
            )
        lines += attempt_lines(s)
        for shard in s.get("failed_shards", []):
            lines.append(f"failed {shard}")
    fails = info["failures"]
    if fails:
        shown = fails if limit <= 0 else fails[:limit]
        lines.append(f"failures ({len(fails)}):")
        lines.extend(f"  row {f['row']}  edit {f['edit_id']}  {f['reason']}" for f in shown)
        if len(shown) < len(fails):
            lines.append(f"  ... {len(fails) - len(shown)} more (--limit 0 lists all)")
    lines.extend(_review_lines(info, limit, rerun))
    lines.append(
        f"report: {info['report_uri']}"
        if info.get("report_uri")
        else "report: none yet (written when a run or rerun finishes)"
    )
    if info["state"] != "finished":
        lines.append(f"finish it with: {rerun}")
    return "\n".join(lines)


def _review_lines(info: dict[str, Any], limit: int, rerun: str) -> list[str]:
    """``editflow show``'s needs-review list: the succeeded edits the QA gate flagged, worst first
    (`rerun`: the command that reruns the run, as format_overview words it)."""
    review = info.get("needs_review") or []
    if not review:
        return []
    gate = ((info.get("summary") or {}).get("qa") or {}).get("gate")
    shown = review if limit <= 0 else review[:limit]
    lines = [f"needs review ({len(review)}, worst first{f'; gate {gate}' if gate else ''}):"]
    lines += [f"  row {r.get('row')}  edit {r['edit_id']}  {r['qa']}" for r in shown]
    if len(shown) < len(review):
        lines.append(f"  ... {len(review) - len(shown)} more (--limit 0 lists all)")
    lines.append(f"re-edit them with other settings: {rerun} --needs-review --settings JSON")
    return lines


def _margin(value: float | None) -> str:
    """A qa_text margin as shown: ``text 0.123``, or why there is none."""
    return "not judged" if value is None else f"text {value:.3f}"


def _scores(r: dict[str, Any]) -> str:
    """A flagged edit's QA scores as shown: its margin, and its CLIP score when the run had one."""
    clip = r.get("qa_clip")
    return _margin(r.get("qa_text")) + ("" if clip is None else f" · clip {clip:.3f}")


def _per_hour(edits: int, seconds: float) -> str:
    return f"{edits / seconds * 3600:.0f} edits/hour" if seconds > 0 else "-- edits/hour"


# ----------------------------------------------------------------------------- attempts (run, reruns)


def attempt_rows(summary: dict[str, Any] | None) -> list[tuple[str, str]]:
    """(attempt, what it did) per attempt of the run, then the total over all of them; [] for a summary
    without attempts (written before they were kept)."""
    attempts = (summary or {}).get("attempts") or []
    rows = []
    for a in attempts:
        tried = "" if a.get("edits") is None else f"{a['edits']} tried: "
        when = f", finished {a['finished']}" if a.get("finished") else ""
        rows.append((
            f"attempt {a.get('attempt')} ({a.get('kind')}{when})",
            f"{tried}{a.get('succeeded', 0)} succeeded, {a.get('failed', 0)} failed; "
            f"{float(a.get('seconds') or 0):.1f}s; {_per_hour(a.get('succeeded', 0), float(a.get('seconds') or 0))}",
        ))  # fmt: skip
    if attempts:
        wall = sum(float(a.get("seconds") or 0) for a in attempts)
        done = sum(int(a.get("succeeded") or 0) for a in attempts)
        rows.append((
            f"all {len(attempts)} attempt(s)",
            f"{done} succeeded in {wall:.1f}s; {_per_hour(done, wall)}",
        ))  # fmt: skip
    return rows


def attempt_lines(summary: dict[str, Any] | None) -> list[str]:
    """`editflow show`'s lines for the attempts (only when the run was rerun: one attempt is the totals)."""
    rows = attempt_rows(summary)
    return [f"{k}: {v}" for k, v in rows] if len(rows) > 2 else []


def attempts_html(summary: dict[str, Any] | None) -> list[str]:
    """The report's table of attempts (none for a summary without them)."""
    rows = attempt_rows(summary)
    if not rows:
        return []
    return (
        [f"<h2>Attempts ({len(rows) - 1})</h2><table id=attempts>"]
        + [f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in rows]
        + ["</table>"]
    )


# ----------------------------------------------------------------------------- what the page shows


def settings_diff(
    method: str, settings: dict[str, Any], *, seed: Any = None, num_steps: Any = None
) -> dict[str, Any]:
    """The settings of one edit that differ from its method's defaults (plus seed and steps)."""
    diff: dict[str, Any] = {}
    if seed is not None and seed != DEFAULT_SEED:
        diff["seed"] = seed
    if num_steps is not None and num_steps != DEFAULT_NUM_STEPS:
        diff["num_steps"] = num_steps
    cls = METHOD_CONFIGS.get(method)
    defaults = config_to_settings(cls()) if cls is not None else {}
    if "guidance_scale" in defaults:
        defaults["guidance_scale"] = default_guidance(method)
    for k, v in sorted(settings.items()):
        if _canon(defaults.get(k, object())) != _canon(v):
            diff[k] = v
    return diff


def _canon(value: Any) -> str:
    if isinstance(value, tuple):
        value = list(value)
    try:
        return json.dumps(value, sort_keys=True)
    except TypeError:
        return repr(value)


@dataclass
class _Edit:
    row: int | None
    edit_id: str
    target_prompt: str
    method: str
    status: str
    error: str | None
    output_uri: str | None
    unet_evals: float | None
    seconds: float | None
    settings: dict[str, Any] = field(default_factory=dict)
    image: Image.Image | None = None
    qa_text: float | None = None  # the edit-QA margin (None: not judged)
    qa: str | None = None  # why the QA gate flags it (None: it passes)

    @property
    def label(self) -> str:
        """Its status as shown: a flagged succeeded edit "needs review"."""
        return "needs review" if self.qa and self.status == "succeeded" else self.status


@dataclass
class _Source:
    image_uri: str
    source_prompt: str
    edits: list[_Edit]
    more: int = 0  # edits of this source image not shown
    image: Image.Image | None = None


def sample_sources(results: pa.Table, k: int) -> list[str]:
    """Up to `k` source image URIs spread evenly over the run (in manifest order); all when fewer."""
    if not results.num_rows:
        return []
    ordered = results.sort_by("row") if "row" in results.column_names else results
    uris = pc.unique(ordered.column("image_uri")).to_pylist()
    if len(uris) <= k:
        return uris
    if k <= 1:
        return uris[:k]
    return [uris[round(i * (len(uris) - 1) / (k - 1))] for i in range(k)]


def _gather(
    store: ObjectStore, run: RunFiles, chosen: list[str], per_source: int, s3_endpoint: str | None
) -> list[_Source]:
    """The chosen sources with their edits' prompts and settings (from shard plans, or sidecars for rows
    skipped at planning), at most `per_source` edits each."""
    table = run.results.filter(
        pc.is_in(run.results.column("image_uri"), pa.array(chosen, pa.string()))
    )
    if "row" in table.column_names:
        table = table.sort_by("row")
    rows = table.to_pylist()
    by_uri: dict[str, list[dict]] = {}
    for r in rows:
        by_uri.setdefault(r["image_uri"], []).append(r)
    shown = [r for u in chosen for r in by_uri.get(u, [])[:per_source]]
    # shard plans hold source prompts and settings; read each needed one once
    plan_keys = {
        keys.shard_plan_key_of_results(r["_file"])
        for r in shown
        if keys.is_shard_results_file(r["_file"])
    }
    with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
        plans = dict(zip(plan_keys, pool.map(lambda k: _read_plan_rows(store, k), plan_keys)))
        side_rows = [
            r for r in shown if not keys.is_shard_results_file(r["_file"]) and r.get("metadata_uri")
        ]
        sidecars = dict(
            zip(
                [r["edit_id"] for r in side_rows],
                pool.map(lambda r: _read_sidecar(r["metadata_uri"], s3_endpoint), side_rows),
            )
        )
    groups: dict[tuple[str, str], _Source] = {}
    for r in shown:
        in_shard = keys.is_shard_results_file(r["_file"])  # else the skipped rows': no shard plan
        plan = plans.get(keys.shard_plan_key_of_results(r["_file"])) if in_shard else None
        plan_row = (plan or {}).get(r["edit_id"])
        side = sidecars.get(r["edit_id"]) or {}
        if plan_row is not None:
            src_prompt = plan_row["source_prompt"]
            settings = {
                **json.loads(plan_row.get("settings") or "{}"),
                "guidance_scale": plan_row["guidance_scale"],
                "negative_prompt": plan_row["negative_prompt"],
            }
            diff = settings_diff(
                r["method"], settings, seed=plan_row["seed"], num_steps=plan_row["num_steps"]
            )
        else:
            src_prompt = side.get("source_prompt", "")
            diff = settings_diff(
                r["method"],
                side.get("settings") or {},
                seed=side.get("seed"),
                num_steps=side.get("num_steps"),
            )
        e = _Edit(
            row=r.get("row"), edit_id=r["edit_id"], target_prompt=r.get("target_prompt") or "", method=r.get("method") or "",
            status=r["status"], error=r.get("error"), output_uri=r.get("output_uri") or side.get("output_uri"),
            unet_evals=r.get("unet_evals") if r.get("unet_evals") is not None else side.get("unet_evals"),
            seconds=r.get("seconds") if r.get("seconds") is not None else side.get("seconds"), settings=diff,
            qa_text=r.get("qa_text"), qa=r.get("qa"),
        )  # fmt: skip
        key = (r["image_uri"], src_prompt)
        if key not in groups:
            groups[key] = _Source(r["image_uri"], src_prompt, [])
        groups[key].edits.append(e)
    shown_per_uri: dict[str, int] = {}
    for g in groups.values():
        shown_per_uri[g.image_uri] = shown_per_uri.get(g.image_uri, 0) + len(g.edits)
    last_of_uri = {
        g.image_uri: g for g in groups.values()
    }  # the note goes after a source's last group
    for uri, g in last_of_uri.items():
        g.more = len(by_uri.get(uri, [])) - shown_per_uri[uri]
    return list(groups.values())


def _read_plan_rows(store: ObjectStore, key: str) -> dict[str, dict[str, Any]]:
    try:
        table = read_shard_plan(store, *keys.shard_of_plan_key(key))
    except NotFound:
        return {}
    cols = [
        c
        for c in (
            "edit_id",
            "source_prompt",
            "settings",
            "seed",
            "num_steps",
            "guidance_scale",
            "negative_prompt",
        )
        if c in table.column_names
    ]
    return {r["edit_id"]: r for r in table.select(cols).to_pylist()}


def _read_sidecar(uri: str, s3_endpoint: str | None) -> dict[str, Any] | None:
    try:
        return json.loads(read_uri(uri, s3_endpoint=s3_endpoint))
    except Exception as exc:  # noqa: BLE001 - the report then shows what the results row has
        logger.info("report: cannot read sidecar %s (%s: %s)", uri, type(exc).__name__, exc)
        return None


def _load_image(uri: str | None, s3_endpoint: str | None) -> Image.Image | None:
    if not uri:
        return None
    try:
        image = Image.open(io.BytesIO(read_uri(uri, s3_endpoint=s3_endpoint)))
        image.load()
        return image.convert("RGB")
    except Exception as exc:  # noqa: BLE001 - a missing source is shown as missing, not an error
        logger.info("report: cannot read image %s (%s: %s)", uri, type(exc).__name__, exc)
        return None


def thumbnail_bytes(image: Image.Image, size: int = THUMB) -> tuple[str, bytes]:
    """``(mime, bytes)`` of a thumbnail at most `size` pixels on its longest side: PNG for small images
    (exact pixels), JPEG for photos."""
    im = image.copy()
    im.thumbnail((size, size), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    if im.width * im.height <= 96 * 96:
        im.save(buf, format="PNG", optimize=True)
        return "image/png", buf.getvalue()
    im.save(buf, format="JPEG", quality=82, optimize=True)
    return "image/jpeg", buf.getvalue()


def _data_uri(image: Image.Image | None) -> str | None:
    if image is None:
        return None
    mime, data = thumbnail_bytes(image)
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def _load_images(sources: list[_Source], s3_endpoint: str | None) -> None:
    jobs: list[tuple[Any, str | None]] = []
    for s in sources:
        jobs.append((s, s.image_uri))
        jobs.extend((e, e.output_uri if e.status != "failed" else None) for e in s.edits)
    with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
        images = list(pool.map(lambda j: _load_image(j[1], s3_endpoint), jobs))
    for (obj, _), im in zip(jobs, images):
        obj.image = im


# ----------------------------------------------------------------------------- totals


def totals(summary: dict[str, Any] | None, run: RunFiles) -> dict[str, Any]:
    """Counts by status, inversions computed / from cache, UNet evaluations, seconds by stage, edits/hour."""
    s = summary or {}
    counts = dict(s.get("counts") or _counts(run.results))
    secs = {k: float(v) for k, v in (s.get("seconds") or {}).items()}
    wall = secs.get("wall", 0.0)
    return {
        "rows": run.plan.get("rows", run.results.num_rows),
        "counts": counts,
        "inversions_computed": s.get("inversions_computed"),
        "inversion_cache_hits": s.get("inversion_cache_hits"),
        "unet_evals": s.get("unet_evals"),
        "seconds": {k: secs[k] for k in _STAGES if k in secs}
        | {k: v for k, v in secs.items() if k not in _STAGES},
        "edits_per_hour": counts.get("succeeded", 0) / wall * 3600 if wall > 0 else None,
        "failed_shards": list(s.get("failed_shards") or []),
        "needs_review": s.get("needs_review", len(needs_review(run.results))),
        "qa_gate": (s.get("qa") or {}).get("gate"),
    }


def _totals_rows(t: dict[str, Any]) -> list[tuple[str, str]]:
    c = t["counts"]
    rows = [("edits", str(t["rows"]))] + [
        (k, str(c.get(k, 0))) for k in ("succeeded", "failed", "skipped")
    ]
    if t.get("needs_review") is not None:
        gate = f" (gate {t['qa_gate']})" if t.get("qa_gate") else ""
        rows.append((f"needs review{gate}", str(t["needs_review"])))
    if t["inversions_computed"] is not None:
        rows.append(
            (
                "inversions computed / from cache",
                f"{t['inversions_computed']} / {t['inversion_cache_hits']}",
            )
        )
    if t["unet_evals"] is not None:
        rows.append(("UNet evaluations", f"{t['unet_evals']:.0f}"))
    rows += [
        (f"seconds: {k.replace('shards_', 'shards ')}", f"{v:.1f}") for k, v in t["seconds"].items()
    ]
    if t["edits_per_hour"] is not None:
        rows.append(("edits per hour", f"{t['edits_per_hour']:.0f}"))
    rows += [("failed shard", s) for s in t["failed_shards"]]
    return rows


# ----------------------------------------------------------------------------- the page

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;background:#fff}
h1{font-size:20px}h2{font-size:16px;margin-top:28px}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}
.source{display:flex;flex-wrap:wrap;gap:10px;border-top:1px solid #ddd;padding:12px 0}
figure{margin:0;width:170px}figure img,.missing{width:160px;height:160px;object-fit:contain;
image-rendering:pixelated;background:#f3f3f3;border:1px solid #ccc;display:block}
.missing{display:flex;align-items:center;justify-content:center;color:#a00;font-size:12px;text-align:center}
figcaption{font-size:12px;word-wrap:break-word}.src figcaption b{color:#036}
.failed figcaption .st{color:#a00;font-weight:bold}.succeeded .st{color:#070}.skipped .st{color:#666}
code{font-size:11px;color:#555}.note{color:#666}
.review .st,.qa-flag{color:#b60;font-weight:bold}
"""


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def render_html(run: RunFiles, t: dict[str, Any], sources: list[_Source], fails: list[dict], *, sources_total: int,
                failures_uri: str | None, contact_sheet_name: str = CONTACT_SHEET_NAME,
                review: list[dict] | None = None) -> str:  # fmt: skip
    """The report page (self-contained: styles inline, thumbnails as data: URIs); `review`: the edits
    the QA gate flagged, worst first (:func:`tasks.results.needs_review`)."""
    state = "finished" if run.finished else "interrupted"
    p = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>editflow run {_esc(run.run_id)}</title><style>{_CSS}</style></head><body>",
        f"<h1>editflow run {_esc(run.run_id)} <span class=note>({state})</span></h1>",
        f"<p class=note>manifest <code>{_esc(run.plan.get('manifest', ''))}</code>; created {_esc(run.plan.get('created', ''))}; "
        f"report written {_esc(dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds'))}; "
        f'contact sheet: <a href="{_esc(contact_sheet_name)}">{_esc(contact_sheet_name)}</a></p>',
        "<h2>Totals</h2><table id=totals>",
    ]
    p += [f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in _totals_rows(t)]
    p.append("</table>")
    p += attempts_html(run.summary)
    p.append(f"<h2>Failures ({len(fails)})</h2>")
    if fails:
        if failures_uri:
            p.append(
                f'<p class=note>all {len(fails)} in <a href="{_esc(FAILURES_NAME)}">{_esc(FAILURES_NAME)}</a></p>'
            )
        p.append("<table id=failures><tr><th>row</th><th>edit id</th><th>reason</th></tr>")
        p += [
            f"<tr><td>{_esc(f['row'])}</td><td><code>{_esc(f['edit_id'])}</code></td><td>{_esc(f['reason'])}</td></tr>"
            for f in fails[:FAILURES_IN_PAGE]
        ]
        p.append("</table>")
        if len(fails) > FAILURES_IN_PAGE:
            p.append(
                f"<p class=note>{len(fails) - FAILURES_IN_PAGE} more failures in {_esc(FAILURES_NAME)}</p>"
            )
    else:
        p.append("<p>none</p>")
    p += _review_html(review or [], t.get("qa_gate"))
    shown = len({s.image_uri for s in sources})
    note = (
        f"all {sources_total}"
        if shown >= sources_total
        else f"{shown} of {sources_total}, spread evenly over the run"
    )
    p.append(f"<h2>Sources and edits ({note})</h2>")
    for s in sources:
        p.append('<section class="source">')
        p.append(
            '<figure class="src">'
            + _img(s.image, "source")
            + f"<figcaption><b>source</b>: {_esc(s.source_prompt)}<br><code>{_esc(s.image_uri)}</code></figcaption></figure>"
        )
        for e in s.edits:
            cap = [
                f"<span class=st>{_esc(e.label)}</span> · {_esc(e.method)} · row {_esc(e.row)}",
                _esc(e.target_prompt),
            ]
            if e.qa_text is not None or e.qa:
                flag = f" · <span class=qa-flag>{_esc(e.qa)}</span>" if e.qa else ""
                cap.append(f"QA {_esc(_margin(e.qa_text))}{flag}")
            if e.settings:
                cap.append(
                    "<code>"
                    + _esc(", ".join(f"{k}={json.dumps(v)}" for k, v in e.settings.items()))
                    + "</code>"
                )
            if e.unet_evals is not None:
                cap.append(f"{e.unet_evals:.0f} UNet evals · {e.seconds or 0:.1f}s")
            if e.error and e.status == "failed":
                cap.append(f"<span class=st>{_esc(e.error)}</span>")
            missing = "failed" if e.status == "failed" else "image unavailable"
            css = "succeeded review" if e.label == "needs review" else e.status
            p.append(
                f'<figure class="{_esc(css)}">'
                + _img(e.image, missing)
                + "<figcaption>"
                + "<br>".join(cap)
                + "</figcaption></figure>"
            )
        if s.more > 0:
            p.append(f"<p class=note>+{s.more} more edits of this source</p>")
        p.append("</section>")
    p.append("</body></html>")
    return "\n".join(p)


def _review_html(review: list[dict], gate: str | None) -> list[str]:
    """The page's needs-review section: the succeeded edits the QA gate flagged, worst first."""
    if not review and not gate:
        return []
    note = f" · gate <code>{_esc(gate)}</code>" if gate else ""
    p = [f"<h2>Needs review ({len(review)}, worst first{note})</h2>"]
    if not review:
        return p + ["<p>none</p>"]
    p.append("<table id=needs-review><tr><th>row</th><th>edit id</th><th>method</th>"
             "<th>target prompt</th><th>QA text</th><th>why</th></tr>")  # fmt: skip
    p += [
        f"<tr><td>{_esc(r.get('row'))}</td><td><code>{_esc(r['edit_id'])}</code></td><td>{_esc(r.get('method', ''))}</td>"
        f"<td>{_esc(r.get('target_prompt', ''))}</td><td>{_esc(_scores(r))}</td><td>{_esc(r['qa'])}</td></tr>"
        for r in review[:FAILURES_IN_PAGE]
    ]
    p.append("</table>")
    if len(review) > FAILURES_IN_PAGE:
        p.append(f"<p class=note>{len(review) - FAILURES_IN_PAGE} more: the results' qa column</p>")
    return p


def _img(image: Image.Image | None, missing: str) -> str:
    uri = _data_uri(image)
    if uri is None:
        return f'<div class="missing">{_esc(missing)}</div>'
    return f'<img alt="" src="{uri}">'


# ----------------------------------------------------------------------------- the contact sheet


def render_contact_sheet(
    sources: list[_Source], *, cell: int = 128, max_edits: int = SHEET_EDITS
) -> Image.Image:
    """One row per source: the source, then its edits, each captioned (prompt, method, status)."""
    font = ImageFont.load_default(size=11)
    pad, cap_h = 6, 44
    cols = 1 + max((min(len(s.edits), max_edits) for s in sources), default=0)
    width = max(1, cols) * (cell + pad) + pad
    height = max(1, len(sources)) * (cell + cap_h + pad) + pad
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    for r, s in enumerate(sources):
        y = pad + r * (cell + cap_h + pad)
        items = [(s.image, "source: " + s.source_prompt, "#036", "unavailable")]
        for e in s.edits[:max_edits]:
            color = {"failed": "#a00", "needs review": "#b60"}.get(e.label, "#222")
            items.append(
                (
                    e.image,
                    f"{e.label} · {e.method}: {e.target_prompt}",
                    color,
                    "failed" if e.status == "failed" else "unavailable",
                )
            )
        for c, (image, caption, color, missing) in enumerate(items):
            x = pad + c * (cell + pad)
            if image is not None:
                im = image.copy()
                scale = cell / max(im.size)
                resample = Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.LANCZOS
                im = im.resize(
                    (max(1, round(im.width * scale)), max(1, round(im.height * scale))), resample
                )
                sheet.paste(im, (x + (cell - im.width) // 2, y + (cell - im.height) // 2))
            else:
                draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill="#f3f3f3", outline="#ccc")
                draw.text((x + 8, y + cell // 2 - 6), missing, fill=color, font=font)
            draw.multiline_text(
                (x, y + cell + 2),
                _wrap(draw, caption, font, cell, 3),
                fill=color,
                font=font,
                spacing=1,
            )
    return sheet


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int, max_lines: int) -> str:
    words, lines, line = text.split(), [], ""
    for w in words:
        trial = f"{line} {w}".strip()
        if draw.textlength(trial, font=font) <= width or not line:
            line = trial
        else:
            lines.append(line)
            line = w
    if line:
        lines.append(line)
    if len(lines) > max_lines:
        # the first line (status, method) and the end: restyle's style words end the prompt
        tail = lines[len(lines) - max_lines + 1 :]
        lines = [lines[0], "…" + tail[0], *tail[1:]]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- writing


def write_report(
    store: ObjectStore,
    run_id: str,
    *,
    summary: dict[str, Any] | None = None,
    s3_endpoint: str | None = None,
    max_sources: int = MAX_SOURCES,
    max_edits_per_source: int = MAX_EDITS_PER_SOURCE,
) -> dict[str, Any]:
    """Write ``report.html``, ``contact_sheet.png`` (and ``failures.csv`` when any edit failed) under
    ``runs/{run_id}/``; returns their URIs and the report's totals."""
    run = load_run(store, run_id)
    if summary is not None:
        run.summary = summary
    t = totals(run.summary, run)
    fails = failures(run.results)
    chosen = sample_sources(run.results, max_sources)
    sources = _gather(store, run, chosen, max_edits_per_source, s3_endpoint) if chosen else []
    _load_images(sources, s3_endpoint)
    sources_total = len(pc.unique(run.results.column("image_uri"))) if run.results.num_rows else 0
    failures_uri = None
    if fails:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=["row", "edit_id", "reason"])
        writer.writeheader()
        writer.writerows(fails)
        key = keys.failures_key(run_id)
        store.put(key, buf.getvalue().encode("utf-8"))
        failures_uri = store.uri(key)
    else:  # an earlier attempt's list no longer applies
        store.delete(keys.failures_key(run_id))
    page = render_html(
        run, t, sources, fails, sources_total=sources_total, failures_uri=failures_uri,
        review=needs_review(run.results),
    )  # fmt: skip
    report_key = keys.report_key(run_id)
    store.put(report_key, page.encode("utf-8"))
    sheet_key = keys.contact_sheet_key(run_id)
    store.put(sheet_key, png_bytes(render_contact_sheet(sources[:SHEET_SOURCES])))
    info = {
        "report_uri": store.uri(report_key),
        "contact_sheet_uri": store.uri(sheet_key),
        "failures_uri": failures_uri,
        "sources_shown": len({s.image_uri for s in sources}),
        "sources_total": sources_total,
        "images": sum(s.image is not None for s in sources)
        + sum(e.image is not None for s in sources for e in s.edits),
        "bytes": len(page.encode("utf-8")),
    }
    write_json(store, keys.report_info_key(run_id), {**info, "totals": t})
    logger.info("report of run %s: %s", run_id, info["report_uri"])
    return info


def write_run_report(
    out: str, run_id: str, *, summary: dict[str, Any] | None = None, s3_endpoint: str | None = None
) -> dict[str, Any]:
    """:func:`write_report` for the run under the output root `out`."""
    return write_report(
        open_store(out, s3_endpoint=s3_endpoint), run_id, summary=summary, s3_endpoint=s3_endpoint
    )


def report_markdown(
    summary: dict[str, Any],
    info: dict[str, Any] | None,
    fails: list[dict[str, Any]] | None = None,
    *,
    limit: int = 50,
) -> str:
    """The Prefect markdown artifact: the totals table, the first failures, a link to the report."""
    c = summary["counts"]
    secs = summary.get("seconds", {})
    rows = [("succeeded", c.get("succeeded", 0)), ("failed", c.get("failed", 0)), ("skipped", c.get("skipped", 0)),
            ("inversions computed / from cache", f"{summary.get('inversions_computed', 0)} / {summary.get('inversion_cache_hits', 0)}"),
            ("UNet evaluations", f"{summary.get('unet_evals', 0):.0f}")]  # fmt: skip
    if "needs_review" in summary:
        rows.insert(1, ("needs review", summary["needs_review"]))
    rows += [
        (f"seconds: {k.replace('shards_', 'shards ')}", f"{secs[k]:.1f}")
        for k in _STAGES
        if k in secs
    ]
    if secs.get("wall"):
        rows.append(("edits per hour", f"{c.get('succeeded', 0) / secs['wall'] * 3600:.0f}"))
    md = [f"# editflow run {summary['run_id']}", "", "| | |", "|---|---|"]
    md += [f"| {k} | {v} |" for k, v in rows]
    if fails:
        md += ["", f"## Failures ({len(fails)})", "", "| row | edit id | reason |", "|---|---|---|"]
        md += [
            f"| {f['row']} | `{f['edit_id']}` | {str(f['reason']).replace('|', '/')} |"
            for f in fails[:limit]
        ]
        if len(fails) > limit:
            md.append(
                f"\n{len(fails) - limit} more in `{info.get('failures_uri') if info else FAILURES_NAME}`"
            )
    md += ["", f"results: `{summary.get('results_uri', '')}`"]
    if info and info.get("report_uri"):
        md.append(
            f"\nreport: [{info['report_uri']}]({_link(info['report_uri'])}) · contact sheet: [{info['contact_sheet_uri']}]({_link(info['contact_sheet_uri'])})"
        )
    return "\n".join(md) + "\n"


def _link(uri: str) -> str:
    return uri if "://" in uri else "file://" + uri
