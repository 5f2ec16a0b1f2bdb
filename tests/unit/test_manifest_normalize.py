"""normalize() and edit_rows(): defaults, derived edit ids, passthrough columns, EditRow and its config."""

from __future__ import annotations

import pandas as pd
import pyarrow as pa
import pytest

from editing.configs import P2PConfig, PnPConfig
from manifests import NORMALIZED_SCHEMA, EditRow, ManifestError, edit_rows, normalize
from manifests.identity import derive_edit_id

TABLE = pa.table(
    {
        "image_uri": ["s3://b/a.png", "s3://b/a.png", "/data/b.png"],
        "source_prompt": ["a cat", "a cat", "a red circle"],
        "target_prompt": ["a dog", "a fox", "a red square"],
        "edit_id": ["mine-1", None, ""],
        "method": [None, "pnp", "p2p"],
        "seed": pa.array([None, 7, 3], pa.int64()),
        "guidance_scale": [None, 5.0, None],
        "settings": [None, '{"attn_t": 0.4}', '{"kind": "replace", "guidance_scale": 9}'],
        "sku": ["A", "B", "C"],
        "price": [1.5, None, 3.0],
        "tags": [["x"], [], None],
    }
)


def test_normalize_fills_defaults_and_keeps_passthrough() -> None:
    out = normalize(TABLE)
    assert out.schema.names == [f.name for f in NORMALIZED_SCHEMA] + ["sku", "price", "tags"]
    assert out.column("row").to_pylist() == [0, 1, 2]
    assert out.column("method").to_pylist() == ["pnp", "pnp", "p2p"]
    assert out.column("seed").to_pylist() == [0, 7, 3]
    assert out.column("num_steps").to_pylist() == [50, 50, 50]
    assert out.column("guidance_scale").to_pylist() == [
        7.5,
        5.0,
        9.0,
    ]  # column, else settings, else default
    assert out.column("negative_prompt").to_pylist() == ["", "", ""]
    assert out.column("settings").to_pylist() == ["{}", '{"attn_t":0.4}', '{"kind":"replace"}']
    for name in ("sku", "price", "tags"):
        assert out.column(name).equals(TABLE.column(name))  # untouched, types included


def test_edit_ids_given_kept_missing_derived_deterministically() -> None:
    ids = normalize(TABLE).column("edit_id").to_pylist()
    assert ids[0] == "mine-1"
    assert ids[1] == derive_edit_id(
        "s3://b/a.png", "a cat", "a fox", "pnp", {"attn_t": 0.4}, 7, 50, 5.0, ""
    )
    assert ids[2] == derive_edit_id(
        "/data/b.png", "a red circle", "a red square", "p2p", {"kind": "replace"}, 3, 50, 9.0
    )
    assert normalize(TABLE).column("edit_id").to_pylist() == ids  # same manifest, same ids
    changed = TABLE.set_column(2, "target_prompt", pa.array(["a dog", "a wolf", "a red square"]))
    assert normalize(changed).column("edit_id").to_pylist()[1] != ids[1]
    no_id_column = TABLE.drop_columns(["edit_id"])
    assert normalize(no_id_column).column("edit_id").to_pylist()[1:] == ids[1:]


def test_derived_ids_ignore_passthrough_and_settings_spelling() -> None:
    a = TABLE.set_column(8, "sku", pa.array(["X", "Y", "Z"]))
    b = TABLE.set_column(
        7,
        "settings",
        pa.array([None, '{ "attn_t" : 0.4 }', '{"guidance_scale": 9, "kind": "replace"}']),
    )
    ids = normalize(TABLE).column("edit_id").to_pylist()
    assert normalize(a).column("edit_id").to_pylist() == ids
    assert normalize(b).column("edit_id").to_pylist() == ids


def test_edit_rows() -> None:
    rows = list(edit_rows(normalize(TABLE)))
    assert [r.row for r in rows] == [0, 1, 2]
    first = rows[0]
    assert first == EditRow(
        row=0,
        edit_id="mine-1",
        image_uri="s3://b/a.png",
        source_prompt="a cat",
        target_prompt="a dog",
        method="pnp",
        seed=0,
        num_steps=50,
        guidance_scale=7.5,
        negative_prompt="",
        config=PnPConfig(),
        passthrough={"sku": "A", "price": 1.5, "tags": ["x"]},
    )
    assert first.config == PnPConfig()
    assert rows[1].config == PnPConfig(guidance_scale=5.0, attn_t=0.4)
    assert rows[2].config == P2PConfig(kind="replace", guidance_scale=9.0)
    assert EditRow.from_dict(rows[2].to_dict()) == rows[2]
    with pytest.raises(ValueError, match="unknown EditRow field"):
        EditRow.from_dict({**rows[2].to_dict(), "extra": 1})
    with pytest.raises(AttributeError):
        first.seed = 3  # type: ignore[misc]  # frozen


def test_edit_rows_of_a_subset_and_small_batches() -> None:
    norm = normalize(TABLE)
    subset = list(edit_rows(norm.take([2, 0]), batch_size=1))
    assert [r.row for r in subset] == [2, 0]
    with pytest.raises(ValueError, match="not a normalized manifest"):
        list(edit_rows(TABLE))


def test_normalize_refuses_invalid_manifest() -> None:
    bad = TABLE.set_column(5, "seed", pa.array(["1", "2", "3"]))
    with pytest.raises(ManifestError) as info:
        normalize(bad)
    assert [(p.row, p.column) for p in info.value.problems] == [(None, "seed")]
    assert "column 'seed': must be an integer column" in str(info.value)


def test_pandas_index_is_not_passthrough() -> None:
    frame = TABLE.drop_columns(["tags"]).to_pandas().set_index("sku")
    table = pa.Table.from_pandas(frame)
    assert "sku" in table.column_names  # pandas stores a named index as a column
    unnamed = pa.Table.from_pandas(TABLE.drop_columns(["tags"]).to_pandas().iloc[[2, 0, 1]])
    assert "__index_level_0__" in unnamed.column_names
    out = normalize(unnamed)
    assert "__index_level_0__" not in out.column_names
    assert out.column("sku").to_pylist() == ["C", "A", "B"]


def test_pandas_written_manifest_with_missing_values() -> None:
    """pandas writes missing ints as NaN floats: accepted when the present values are integral."""
    frame = pd.DataFrame(
        {
            "image_uri": ["a.png", "b.png"],
            "source_prompt": ["a", "b"],
            "target_prompt": ["c", "d"],
            "seed": [1, None],
            "num_steps": [None, 25],
        }
    )
    out = normalize(pa.Table.from_pandas(frame))
    assert out.column("seed").to_pylist() == [1, 0]
    assert out.column("num_steps").to_pylist() == [50, 25]


def test_edit_rows_build_each_distinct_config_once(monkeypatch) -> None:
    """Rows with the same method, settings, guidance and negative prompt share one config object,
    built once (not once per row, not once per access)."""
    import manifests.normalise as normalise

    table = pa.table(
        {
            "image_uri": [f"img-{i}.png" for i in range(6)],
            "source_prompt": ["a cat"] * 6,
            "target_prompt": ["a dog"] * 6,
            "method": ["pnp", "pnp", "pnp", "p2p", "pnp", "pnp"],
            # rows 0, 1 and 5 spell one settings value in two ways; row 4 differs by guidance
            "settings": [
                '{"attn_t": 0.4}',
                '{"attn_t": 0.4}',
                None,
                None,
                '{"attn_t": 0.4}',
                '{ "attn_t" : 0.4 }',
            ],  # fmt: skip
            "guidance_scale": [None, None, None, None, 9.0, None],
        }
    )
    built = []
    real = normalise.config_from_settings

    def counting(method, settings):
        built.append((method, dict(settings)))
        return real(method, settings)

    monkeypatch.setattr(normalise, "config_from_settings", counting)
    rows = list(edit_rows(normalize(table), batch_size=2))  # shared across batches too
    assert len(built) == 4  # (pnp, attn_t 0.4, 7.5), (pnp, {}), (p2p, {}), (pnp, attn_t 0.4, 9.0)
    assert rows[0].config is rows[1].config is rows[5].config
    assert rows[0].config == PnPConfig(attn_t=0.4)
    assert rows[2].config == PnPConfig() and rows[3].config == P2PConfig()
    assert rows[4].config == PnPConfig(attn_t=0.4, guidance_scale=9.0)
    assert not hasattr(EditRow, "settings_json") and "settings" not in EditRow.__dataclass_fields__


def test_edit_rows_name_the_row_of_settings_a_config_refuses() -> None:
    norm = normalize(TABLE)
    broken = norm.set_column(
        norm.schema.get_field_index("settings"), "settings", pa.array(["{}", '{"attn_t": 7}', "{}"])
    )
    with pytest.raises(ValueError, match="row 1: settings"):
        list(edit_rows(broken))
