"""The example manifests: generated ones are valid (demo) or invalid in the intended ways (bad)."""

from __future__ import annotations

from pathlib import Path

import pytest

from manifests import normalize, prepare_manifest, restyle_manifest

EXAMPLES = Path(__file__).resolve().parents[2] / "manifests" / "examples"


def _check_demo(path: Path) -> None:
    prepared = prepare_manifest(str(path), normalize=False)
    table, problems = prepared.table, prepared.problems
    assert problems == [] and table is not None
    norm = normalize(table)
    assert norm.num_rows == 9 and len(set(norm.column("image_uri").to_pylist())) == 3
    assert set(norm.column("method").to_pylist()) == {"pnp", "p2p"}
    assert "sku" in norm.column_names
    from manifests.examples.make_examples import RECOMMENDED_METHOD

    for sku, method in zip(norm.column("sku").to_pylist(), norm.column("method").to_pylist()):
        assert method == RECOMMENDED_METHOD[sku.rsplit("-", 1)[1]], sku  # e.g. SKU-000-colour


def _check_bad(path: Path) -> None:
    problems = prepare_manifest(str(path), normalize=False).problems
    columns = {p.column for p in problems}
    assert len(problems) == 11 and all(p.row is not None for p in problems)
    assert {
        "image_uri",
        "source_prompt",
        "target_prompt",
        "method",
        "num_steps",
        "guidance_scale",
        "settings",
        "edit_id",
    } <= columns


def test_checked_in_examples() -> None:
    _check_demo(EXAMPLES / "demo.parquet")
    _check_bad(EXAMPLES / "bad.parquet")
    assert restyle_manifest(EXAMPLES / "catalog.csv", ["x", "y"]).num_rows == 6
    for i in range(3):
        assert (EXAMPLES / "images" / f"scene-{i}.png").is_file()


def test_make_examples(tmp_path: Path) -> None:
    pytest.importorskip("refmodel.domain")
    from manifests.examples.make_examples import make_examples

    written = make_examples(tmp_path, image_root="s3://bucket/images")
    _check_demo(written["demo"])
    _check_bad(written["bad"])
    table = prepare_manifest(str(written["demo"]), normalize=False).table
    assert table.column("image_uri")[0].as_py() == "s3://bucket/images/scene-0.png"
    # same seed, same files
    again = make_examples(tmp_path / "again", image_root="s3://bucket/images")
    assert again["demo"].read_bytes() == written["demo"].read_bytes()
    assert again["scene-0"].read_bytes() == written["scene-0"].read_bytes()
