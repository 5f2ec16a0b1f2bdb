"""`editflow validate` checks that every source exists and is a readable regular file or object, and
names the model whose token budget it applied."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from manifests.validate import source_problems
from storage.uri import unreadable_uris
from tests.reliability.helpers import cli_output


def _manifest(path: Path, uris: list[str]) -> str:
    n = len(uris)
    table = pa.table(
        {
            "image_uri": uris,
            "source_prompt": ["a red circle"] * n,
            "target_prompt": [f"a blue circle {i}" for i in range(n)],
        }
    )
    pq.write_table(table, path)
    return str(path)


@pytest.fixture
def sources(tmp_path: Path) -> dict[str, str]:
    """A readable file, a missing one, a folder, a FIFO and (unless root) an unreadable file."""
    ok = tmp_path / "ok.png"
    ok.write_bytes(b"\x89PNG")
    folder = tmp_path / "folder.png"
    folder.mkdir()
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    locked = tmp_path / "locked.png"
    locked.write_bytes(b"x")
    locked.chmod(0)
    return {"ok": str(ok), "missing": str(tmp_path / "missing.png"), "folder": str(folder),
            "fifo": str(fifo), "locked": str(locked)}  # fmt: skip


def test_each_unreadable_source_is_a_problem_at_its_first_row(tmp_path, sources):
    uris = [sources["ok"], sources["missing"], sources["folder"], sources["missing"], sources["fifo"],
            "http://example.com/x.png", sources["locked"]]  # fmt: skip
    problems = source_problems(_manifest(tmp_path / "m.parquet", uris))
    text = {p.row: p.reason for p in problems}
    assert all(p.column == "image_uri" for p in problems)
    assert text[1] == f"source image not found: {sources['missing']} (also row 3)"
    assert text[2] == f"source image {sources['folder']} is a folder, not a regular file"
    assert text[4] == f"source image {sources['fifo']} is a FIFO, not a regular file"
    assert 5 not in text  # an unsupported URI is the table check's problem, not checked twice
    if os.geteuid() != 0:  # root reads anything
        assert text[6] == f"source image {sources['locked']} is not readable (permission denied)"
    assert 0 not in text and 3 not in text


def test_s3_sources_are_checked_with_a_head(s3_bucket, s3_server, s3_client):
    bucket = s3_bucket.removeprefix("s3://").split("/")[0]
    s3_client.put_object(Bucket=bucket, Key="img/a.png", Body=b"x")
    present, absent = f"s3://{bucket}/img/a.png", f"s3://{bucket}/img/b.png"
    many = [present, absent] * 20  # distinct URIs are checked once each
    bad = unreadable_uris(many, s3_endpoint=s3_server, threads=4)
    assert list(bad) == [absent] and str(bad[absent]) == f"no object at {absent}"


def test_validate_cli_reports_sources_unless_told_not_to(tmp_path, sources, capsys):
    path = _manifest(tmp_path / "m.parquet", [sources["ok"], sources["missing"]])
    code, text = cli_output(["validate", path], capsys)
    assert code == 2, text
    assert f"row 1, column 'image_uri': source image not found: {sources['missing']}" in text
    assert "INVALID (1 problem(s)); prompt lengths checked against the bundled reference model (16 tokens; --model M for another)" in text  # fmt: skip
    code, text = cli_output(["validate", path, "--no-check-sources"], capsys)
    assert code == 0 and f"{path}: valid (2 rows);" in text, text
    good = _manifest(tmp_path / "g.parquet", [sources["ok"]] * 3)
    code, text = cli_output(["validate", good], capsys)
    assert code == 0 and f"{good}: valid (3 rows, sources checked);" in text, text
