"""The run report as data: settings shown, run URIs resolved, and a synthetic 100k-edit run (no model)
whose report stays small, lists every failure and reads only the sampled sources' files."""

from __future__ import annotations

import csv
import io
import json
import re

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from storage import keys
from storage.local import LocalStore
from storage.writer import write_json, write_parquet
from tasks import report
from tasks.results import RESULT_FIELDS


@pytest.mark.parametrize(
    ("method", "settings", "extra", "expected"),
    [
        ("pnp", {"guidance_scale": 7.5, "negative_prompt": ""}, {"seed": 0, "num_steps": 50}, {}),
        ("pnp", {"feature_t": 0.6, "guidance_scale": 7.5}, {}, {"feature_t": 0.6}),
        (
            "p2p",
            {"cross_replace_steps": 0.8, "self_replace_steps": 0.2},
            {"seed": 3},
            {"seed": 3, "self_replace_steps": 0.2},
        ),
        (
            "p2p",
            {"guidance_scale": 5.0, "blend_source_words": ["cat"]},
            {"num_steps": 20},
            {"num_steps": 20, "guidance_scale": 5.0, "blend_source_words": ["cat"]},
        ),
        (
            "pnp",
            {"feature_layers": ("up_blocks.1.resnets.1",)},
            {},
            {"feature_layers": ("up_blocks.1.resnets.1",)},
        ),
    ],
)
def test_settings_diff_shows_only_what_differs_from_the_defaults(method, settings, extra, expected):
    assert report.settings_diff(method, settings, **extra) == expected


@pytest.mark.parametrize(
    ("ref", "out", "expected"),
    [
        ("out/demo/runs/R1", None, ("out/demo", "R1")),
        ("out/demo/runs/R1/", None, ("out/demo", "R1")),
        (
            "s3://bucket/prefix/runs/20250101T000000Z-abc123",
            None,
            ("s3://bucket/prefix", "20250101T000000Z-abc123"),
        ),
        ("file:///data/out/runs/R2", None, ("file:///data/out", "R2")),
        ("R3", "s3://b/p", ("s3://b/p", "R3")),
        ("s3://b/p/runs/R4", "s3://b/p/", ("s3://b/p", "R4")),
        ("runs/R5", None, (".", "R5")),
    ],
)
def test_resolve_run_accepts_a_run_id_with_out_or_the_runs_uri(ref, out, expected):
    assert report.resolve_run(ref, out) == expected


@pytest.mark.parametrize(
    ("ref", "out", "match"),
    [
        ("R1", None, "give the run id with --out"),
        ("s3://b/p/runs/R1", "s3://other/q", "not of --out"),
        ("out/runs/a..b", None, "not key-safe"),
    ],
)
def test_resolve_run_rejects_what_it_cannot_place(ref, out, match):
    with pytest.raises(ValueError, match=match):
        report.resolve_run(ref, out)


class CountingStore(LocalStore):
    """A local store that counts reads (the report must not read one object per edit)."""

    def __init__(self, root):
        super().__init__(root)
        self.gets: list[str] = []

    def get(self, key: str) -> bytes:
        self.gets.append(key)
        return super().get(key)


def _png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buf, format="PNG")
    return buf.getvalue()


def _synthetic_run(
    root, run_id: str, *, shards: int, per_shard: int, edits_per_source: int, fail_every: int
):
    """A finished run's files without any model: plan, shard plans, results (a few real PNGs as outputs)."""
    store = CountingStore(root)
    images = root / "img"
    images.mkdir()
    palette = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]
    for i, c in enumerate(palette):
        (images / f"base-{i}.png").write_bytes(_png(c))
        (images / f"out-{i}.png").write_bytes(_png(tuple(255 - v for v in c)))
    rows_total = shards * per_shard
    plan_shards = []
    for s in range(shards):
        rows = np.arange(s * per_shard, (s + 1) * per_shard)
        src = rows // edits_per_source
        failed = rows % fail_every == 0
        image_uri = [str(images / f"src-{k}.png") for k in src]
        for k in np.unique(src):  # one source file per source (links to 4 real images)
            (images / f"src-{k}.png").symlink_to(images / f"base-{k % 4}.png")
        ids = [f"e{r:07d}" for r in rows]
        plan = pa.table({
            "row": rows, "edit_id": ids, "image_uri": image_uri, "source_prompt": [f"source {k}" for k in src],
            "target_prompt": [f"target {r}" for r in rows], "method": ["pnp" if r % 2 else "p2p" for r in rows],
            "seed": np.zeros(per_shard, np.int64), "num_steps": np.full(per_shard, 50), "guidance_scale": np.full(per_shard, 7.5),
            "negative_prompt": [""] * per_shard, "settings": ['{"feature_t":0.6}' if r % 2 else "{}" for r in rows],
        })  # fmt: skip
        write_parquet(store, keys.shard_plan_key(run_id, s), plan)
        cols = {
            "edit_id": ids, "row": rows, "image_uri": image_uri, "target_prompt": plan.column("target_prompt"),
            "method": plan.column("method"), "status": np.where(failed, "failed", "succeeded"),
            "output_uri": [None if f else f"{images}/out-{r % 4}.png" for r, f in zip(rows, failed)],
            "metadata_uri": [None] * per_shard,
            "error": [f"row {r}: image_uri: no object at x" if f else None for r, f in zip(rows, failed)],
            "reason": [None] * per_shard,
            "cache_hit": [False] * per_shard, "unet_evals": np.full(per_shard, 150.0), "seconds": np.full(per_shard, 2.0),
            "qa_text": [None] * per_shard, "qa": [None] * per_shard, "qa_clip": [None] * per_shard,
        }  # fmt: skip
        table = pa.Table.from_arrays(
            [pa.array(cols[f.name], f.type) for f in RESULT_FIELDS], schema=pa.schema(RESULT_FIELDS)
        )
        write_parquet(store, keys.shard_results_key(run_id, s), table)
        plan_shards.append(
            {"index": s, "edits": per_shard, "sources": per_shard // edits_per_source}
        )
    write_json(
        store,
        keys.plan_key(run_id),
        {
            "run_id": run_id,
            "manifest": "m.parquet",
            "rows": rows_total,
            "shards": plan_shards,
            "options": {},
        },
    )
    n_failed = len(range(0, rows_total, fail_every))
    summary = {
        "run_id": run_id, "rows": rows_total, "counts": {"succeeded": rows_total - n_failed, "failed": n_failed, "skipped": 0},
        "inversions_computed": rows_total // edits_per_source, "inversion_cache_hits": 0, "unet_evals": 150.0 * rows_total,
        "failed_shards": [], "seconds": {"wall": 3600.0, "validate": 1.0, "plan": 2.0, "shards_edit": 3000.0},
        "results_uri": store.uri(keys.run_prefix(run_id) + "results/"),
    }  # fmt: skip
    write_json(store, keys.summary_key(run_id), summary)
    return store, n_failed


def test_a_100k_edit_report_stays_small_lists_every_failure_and_reads_only_the_sample(tmp_path):
    store, n_failed = _synthetic_run(
        tmp_path, "big", shards=100, per_shard=1000, edits_per_source=10, fail_every=20
    )
    store.gets.clear()
    info = report.write_report(store, "big")
    page = (tmp_path / "runs" / "big" / "report.html").read_text()
    assert info["bytes"] == len(page.encode()) < 3_000_000, info["bytes"]
    assert info["sources_total"] == 10_000 and info["sources_shown"] == report.MAX_SOURCES
    assert f"{report.MAX_SOURCES} of 10000, spread evenly" in page
    # every failure: the first FAILURES_IN_PAGE in the page, all of them in failures.csv
    with open(tmp_path / "runs" / "big" / "failures.csv", newline="") as fh:
        listed = list(csv.DictReader(fh))
    assert len(listed) == n_failed == 5000
    assert listed[0] == {
        "row": "0",
        "edit_id": "e0000000",
        "reason": "row 0: image_uri: no object at x",
    }
    failures_table = page.split("<table id=failures>")[1].split("</table>")[0]
    assert failures_table.count("<tr>") == 1 + report.FAILURES_IN_PAGE
    assert f"{n_failed - report.FAILURES_IN_PAGE} more failures in failures.csv" in page
    # the totals: counts, inversions, time by stage, edits per hour
    totals = page.split("<table id=totals>")[1].split("</table>")[0]
    for label, value in [("succeeded", "95000"), ("failed", "5000"), ("inversions computed / from cache", "10000 / 0"),
                         ("seconds: shards edit", "3000.0"), ("edits per hour", "95000")]:  # fmt: skip
        assert f"<th>{label}</th><td>{value}</td>" in totals
    # thumbnails: one per shown source and per shown edit that has an output; settings that differ shown
    imgs = re.findall(r'<img alt="" src="data:image/png;base64,', page)
    shown_ok, shown_failed = (
        page.count('<figure class="succeeded">'),
        page.count('<figure class="failed">'),
    )
    assert shown_ok + shown_failed == report.MAX_SOURCES * 10 and shown_failed >= 1
    assert len(imgs) == info["images"] == report.MAX_SOURCES + shown_ok
    assert page.count('<div class="missing">failed</div>') == shown_failed
    assert "feature_t=0.6" in page
    # reads: every results file once, the plan, and only the shard plans of the sampled sources
    shard_plan_reads = [k for k in store.gets if "/shards/" in k]
    assert len(shard_plan_reads) <= report.MAX_SOURCES
    assert len(store.gets) <= 100 + 2 + report.MAX_SOURCES
    sheet = Image.open(tmp_path / "runs" / "big" / "contact_sheet.png")
    assert sheet.height < 3000 and sheet.width < 1300
    assert (
        json.loads((tmp_path / "runs" / "big" / "report.json").read_text())["sources_total"]
        == 10_000
    )


def test_markdown_artifact_has_the_totals_the_failures_and_a_link():
    summary = {"run_id": "r", "counts": {"succeeded": 8, "failed": 1, "skipped": 0}, "inversions_computed": 3,
               "inversion_cache_hits": 1, "unet_evals": 1500.0, "seconds": {"wall": 36.0, "shards_edit": 30.0},
               "results_uri": "/o/runs/r/results/"}  # fmt: skip
    info = {
        "report_uri": "/o/runs/r/report.html",
        "contact_sheet_uri": "/o/runs/r/contact_sheet.png",
    }
    md = report.report_markdown(
        summary, info, [{"row": 4, "edit_id": "e4", "reason": "row 4: a | b"}]
    )
    assert "| succeeded | 8 |" in md and "| inversions computed / from cache | 3 / 1 |" in md
    assert "| edits per hour | 800 |" in md and "| seconds: shards edit | 30.0 |" in md
    assert "| 4 | `e4` | row 4: a / b |" in md
    assert "[/o/runs/r/report.html](file:///o/runs/r/report.html)" in md
