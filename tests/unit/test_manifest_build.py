"""Manifest builders: restyle (catalog x styles)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from manifests import normalize, restyle_manifest, validate_table
from storage import open_store

CATALOG = pa.table(
    {
        "image_uri": ["s3://shop/a.png", "s3://shop/b.png", "s3://shop/c.png"],
        "caption": ["a red circle", "a blue square", "a green triangle"],
        "sku": ["A-1", "B-2", "C-3"],
    }
)


def test_restyle_three_images_two_styles_six_rows() -> None:
    m = restyle_manifest(CATALOG, ["watercolor", "pixel art"])
    assert m.num_rows == 6
    assert m.column_names == [
        "image_uri",
        "source_prompt",
        "target_prompt",
        "method",
        "sku",
        "style",
    ]
    assert m.column("image_uri").to_pylist() == [
        u for u in CATALOG.column("image_uri").to_pylist() for _ in range(2)
    ]
    assert m.column("target_prompt").to_pylist()[:2] == [
        "a red circle, watercolor",
        "a red circle, pixel art",
    ]
    assert m.column("style").to_pylist() == ["watercolor", "pixel art"] * 3
    assert m.column("sku").to_pylist() == ["A-1", "A-1", "B-2", "B-2", "C-3", "C-3"]
    assert set(m.column("method").to_pylist()) == {"pnp"}
    assert validate_table(m) == []
    assert len(set(normalize(m).column("edit_id").to_pylist())) == 6


def test_restyle_template_method_and_column_names() -> None:
    catalog = CATALOG.rename_columns(["url", "text", "sku"])
    m = restyle_manifest(
        catalog,
        ["oil painting"],
        template="{caption} as an {style} ({sku})",
        method="p2p",
        image_column="url",
        caption_column="text",
    )
    assert m.column("target_prompt").to_pylist()[0] == "a red circle as an oil painting (A-1)"
    assert m.column("method").to_pylist() == ["p2p"] * 3
    assert "url" not in m.column_names and "text" not in m.column_names


def test_restyle_from_csv_and_parquet_files(tmp_path: Path, s3_bucket: str, s3_server: str) -> None:
    pacsv.write_csv(CATALOG, tmp_path / "catalog.csv")
    pq.write_table(CATALOG, tmp_path / "catalog.parquet")
    from_csv = restyle_manifest(tmp_path / "catalog.csv", ["a", "b"])
    from_parquet = restyle_manifest(str(tmp_path / "catalog.parquet"), ["a", "b"])
    assert from_csv.num_rows == from_parquet.num_rows == 6
    assert from_csv.column("target_prompt").equals(from_parquet.column("target_prompt"))
    open_store(s3_bucket, s3_endpoint=s3_server).put(
        "catalog.csv", (tmp_path / "catalog.csv").read_bytes()
    )
    assert restyle_manifest(f"{s3_bucket}/catalog.csv", ["a"], s3_endpoint=s3_server).num_rows == 3


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"styles": []}, "at least one style"),
        ({"styles": "watercolor"}, "list of strings"),
        ({"styles": ["a", "a"]}, "duplicate styles"),
        ({"styles": ["a", " "]}, "non-empty strings"),
        ({"styles": ["a"], "method": "sdedit"}, "unknown method"),
        ({"styles": ["a"], "template": "{caption} {colour}"}, "unknown field"),
        ({"styles": ["a"], "caption_column": "title"}, "no caption column 'title'"),
        ({"styles": ["a"], "image_column": "url"}, "no image column 'url'"),
    ],
)
def test_restyle_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        restyle_manifest(CATALOG, **kwargs)


def test_restyle_rejects_clashing_or_empty_catalogs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="clash"):
        restyle_manifest(CATALOG.append_column("style", pa.array(["x"] * 3)), ["a"])
    with pytest.raises(ValueError, match="empty caption"):
        restyle_manifest(CATALOG.set_column(1, "caption", pa.array(["x", None, "z"])), ["a"])
    with pytest.raises(ValueError, match="no rows"):
        restyle_manifest(CATALOG.slice(0, 0), ["a"])
    (tmp_path / "catalog.json").write_text("{}")
    with pytest.raises(ValueError, match=".parquet or .csv"):
        restyle_manifest(tmp_path / "catalog.json", ["a"])


def test_restyle_settings_go_into_every_row_and_are_validated() -> None:
    import pyarrow as pa

    from manifests.build import restyle_manifest
    from manifests.validate import validate_table

    catalog = pa.table({"image_uri": ["a.png", "b.png"], "caption": ["a red circle", "a cat"]})
    table = restyle_manifest(catalog, ["striped"], settings='{"attn_t": 0.8}')
    assert table.column("settings").to_pylist() == ['{"attn_t": 0.8}'] * 2
    assert validate_table(table) == []
    bad = restyle_manifest(catalog, ["striped"], settings='{"attn_t": 2.0}')
    assert {(p.row, p.column) for p in validate_table(bad)} == {(0, "settings"), (1, "settings")}
    assert "settings" not in restyle_manifest(catalog, ["striped"]).column_names
