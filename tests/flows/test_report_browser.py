"""The report of a real run (tiny model), rendered by headless Chromium: local and S3 (moto) outputs.

Chromium comes from the OS packages (``apt-get install chromium``; .ci/run installs it and sets
EDITFLOW_REQUIRE_BROWSER=1, so that in CI a missing browser fails these tests instead of skipping them).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from flows.bulk_edit import bulk_edit
from flows.cli import main
from tasks.options import RunOptions

from .conftest import demo_rows, get, put, run_args, scene_files, scene_png, write_manifest

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]  # fmt: skip


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("EDITFLOW_REQUIRE_BROWSER") == "1":
        pytest.fail(
            "headless Chromium is required here (EDITFLOW_REQUIRE_BROWSER=1) but none is installed"
        )
    pytest.skip("no chromium on PATH (apt-get install chromium); .ci/run installs it")


def render(report_path, tmp_path) -> tuple[Image.Image, str]:
    """A 1200x1600 screenshot and the DOM of `report_path` as headless Chromium renders them."""
    exe = chromium()
    shot = tmp_path / "shot.png"
    url = report_path.resolve().as_uri()
    common = [exe, *CHROMIUM_FLAGS, "--window-size=1200,1600"]
    subprocess.run(
        [*common, f"--user-data-dir={tmp_path / 'ud1'}", f"--screenshot={shot}", url],
        check=True,
        capture_output=True,
        timeout=120,
    )
    dom = subprocess.run(
        [*common, f"--user-data-dir={tmp_path / 'ud2'}", "--dump-dom", url],
        check=True,
        capture_output=True,
        timeout=120,
        text=True,
    ).stdout
    return Image.open(shot).convert("RGB"), dom


def check_rendered(
    shot: Image.Image, dom: str, *, sources: int, edits_with_output: int, missing: int
) -> None:
    assert shot.size == (1200, 1600)
    colours = shot.getcolors(maxcolors=1_000_000)
    assert colours is not None and len(colours) > 50, "the screenshot is (nearly) a single colour"
    assert (
        shot.convert("L").getextrema()[0] < 100
    )  # some dark pixels: text and thumbnails were drawn
    imgs = re.findall(r"<img [^>]*src=\"data:image/", dom)
    assert len(imgs) == sources + edits_with_output
    assert dom.count('class="missing"') == missing  # failed edits and unreadable sources
    assert "Totals" in dom and "Sources and edits" in dom


def test_a_local_runs_report_renders_every_source_and_edit(
    prefect_server, flow_model, tmp_path, capsys
):
    images = scene_files(tmp_path, 3)
    rows = demo_rows(images)
    rows[4]["image_uri"] = str(tmp_path / "missing.png")  # one edit whose source is missing
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.Table.from_pylist(rows), manifest)
    out = tmp_path / "out"
    assert main(run_args(manifest, out, flow_model, shard_size=4, run_id="r1")) == 1
    text = capsys.readouterr().out
    report = out / "runs" / "r1" / "report.html"
    assert f"report: {report}" in text
    shot, dom = render(report, tmp_path)
    # 4 sources (the missing one shown as unavailable), 8 edits with an image, 1 failed
    check_rendered(shot, dom, sources=3, edits_with_output=8, missing=2)
    assert "image_uri: no such file: /" in dom and "missing.png" in dom
    sheet = Image.open(out / "runs" / "r1" / "contact_sheet.png")
    assert sheet.width > 128 * 4 and sheet.height > 128 * 3


def test_an_s3_runs_report_embeds_its_thumbnails(
    prefect_server, s3_server, s3_client, s3_bucket, flow_model, tmp_path
):
    images = [f"{s3_bucket}/images/scene-{i}.png" for i in range(2)]
    for i, uri in enumerate(images):
        put(s3_client, uri, scene_png(i))
    manifest = f"{s3_bucket}/manifests/m.parquet"
    write_manifest(s3_client, manifest, demo_rows(images)[:7])  # 3 + 4 edits
    options = RunOptions(
        out=f"{s3_bucket}/out", model=flow_model, s3_endpoint=s3_server, shard_size=4
    )
    summary = bulk_edit(manifest, options)
    assert summary["report_uri"] == f"{s3_bucket}/out/runs/{summary['run_id']}/report.html"
    page = tmp_path / "report.html"  # downloaded: the page needs nothing from S3 to render
    page.write_bytes(get(s3_client, summary["report_uri"]))
    shot, dom = render(page, tmp_path)
    check_rendered(shot, dom, sources=2, edits_with_output=7, missing=0)
    sheet = get(s3_client, summary["contact_sheet_uri"])
    assert sheet[:8] == b"\x89PNG\r\n\x1a\n"
