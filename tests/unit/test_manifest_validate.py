"""Manifest validation: every kind of problem reported with row, column and reason; loading."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from manifests import (
    ManifestError,
    Problem,
    format_problems,
    load_manifest,
    manifest_files,
    prepare_manifest,
    validate_table,
)
from storage import open_store

BASE: dict[str, list] = {
    "image_uri": ["s3://bucket/img/a.png", "file:///data/b.png", "images/c.png"],
    "source_prompt": ["a red circle", "a blue square", "a cat"],
    "target_prompt": ["a green circle", "a blue triangle", "a dog"],
    "edit_id": ["e0", "e1", None],
    "method": ["pnp", "p2p", None],
    "seed": pa.array([1, 2, None], pa.int64()),
    "num_steps": pa.array([50, 20, None], pa.int64()),
    "guidance_scale": [7.5, None, 3.0],
    "negative_prompt": [None, "blurry", ""],
    "settings": ['{"feature_t": 0.7}', '{"kind": "replace", "self_replace_steps": 0.3}', None],
    "sku": ["A-1", "A-2", "A-3"],
}


def manifest(**changes) -> pa.Table:
    """BASE with columns replaced (a value) or dropped (None)."""
    cols = {**BASE, **changes}
    return pa.table({k: v for k, v in cols.items() if v is not None})


def test_good_manifest_is_clean() -> None:
    assert validate_table(manifest()) == []
    assert format_problems([]) == "manifest is valid"


def test_minimal_manifest_is_clean() -> None:
    minimal = pa.table({k: BASE[k] for k in ("image_uri", "source_prompt", "target_prompt")})
    assert validate_table(minimal) == []


# (case id, manifest factory, expected [(row, column, reason substring)]) -- exactly these problems
CASES: list[tuple[str, Callable[[], pa.Table], list[tuple[int | None, str | None, str]]]] = [
    (
        "missing required column",
        lambda: manifest(target_prompt=None),
        [(None, "target_prompt", "required column is missing")],
    ),
    (
        "seed as string",
        lambda: manifest(seed=["1", "2", "3"]),
        [(None, "seed", "must be an integer column, got string")],
    ),
    (
        "guidance as string",
        lambda: manifest(guidance_scale=["7.5", None, "3"]),
        [(None, "guidance_scale", "must be a number column")],
    ),
    (
        "prompt as int",
        lambda: manifest(source_prompt=[1, 2, 3]),
        [(None, "source_prompt", "must be a string column, got int64")],
    ),
    (
        "required column all null",
        lambda: manifest(image_uri=pa.nulls(3)),
        [(None, "image_uri", "has no values (type null)")],
    ),
    (
        "null required value",
        lambda: manifest(source_prompt=["a", None, "c"]),
        [(1, "source_prompt", "is null")],
    ),
    (
        "empty required value",
        lambda: manifest(target_prompt=["x", "y", "  "]),
        [(2, "target_prompt", "is empty")],
    ),
    (
        "unknown method",
        lambda: manifest(method=["pnp", "sdedit", None]),
        [(1, "method", "unknown method 'sdedit'; known: pnp, p2p")],
    ),
    (
        "bad settings JSON",
        lambda: manifest(settings=["{oops", None, None]),
        [(0, "settings", "settings is not valid JSON")],
    ),
    (
        "settings not an object",
        lambda: manifest(settings=[None, "[0.5]", None]),
        [(1, "settings", "must be a JSON object, got list")],
    ),
    (
        "unknown setting key",
        lambda: manifest(settings=['{"feature_tt": 0.5}', None, None]),
        [(0, "settings", "unknown pnp setting(s) ['feature_tt']")],
    ),
    (
        "bad setting value",
        lambda: manifest(settings=[None, '{"kind": "swap"}', None]),
        [(1, "settings", "kind must be one of")],
    ),
    (
        "setting valid for the other method",
        lambda: manifest(settings=[None, '{"feature_t": 0.5}', None]),
        [(1, "settings", "settings rejected for method 'p2p'")],
    ),
    (
        "num_steps zero",
        lambda: manifest(num_steps=pa.array([0, 20, None], pa.int64())),
        [(0, "num_steps", "num_steps must be in [1, 1000], got 0")],
    ),
    (
        "num_steps too many",
        lambda: manifest(num_steps=pa.array([50, 1001, None], pa.int64())),
        [(1, "num_steps", "got 1001")],
    ),
    (
        "num_steps fractional",
        lambda: manifest(num_steps=[50.0, 20.5, None]),
        [(1, "num_steps", "num_steps must be an integer, got 20.5")],
    ),
    (
        "seed fractional",
        lambda: manifest(seed=[1.0, 2.5, None]),
        [(1, "seed", "seed must be an integer, got 2.5")],
    ),
    (
        "small unsigned seed is fine",
        lambda: manifest(
            seed=pa.array([1, 2, 300], pa.uint16()), num_steps=pa.array([1, 1000, 0], pa.uint16())
        ),
        [(2, "num_steps", "got 0")],
    ),
    (
        "seed beyond int64",
        lambda: manifest(seed=pa.array([1, 2**64 - 1, None], pa.uint64())),
        [(1, "seed", "does not fit in int64")],
    ),
    (
        "guidance too high",
        lambda: manifest(guidance_scale=[7.5, 31.0, None]),
        [(1, "guidance_scale", "must be a number in [1, 30], got 31.0")],
    ),
    (
        "guidance NaN",
        lambda: manifest(guidance_scale=[float("nan"), None, 3.0]),
        [(0, "guidance_scale", "got nan")],
    ),
    (
        "guidance disagrees with settings",
        lambda: manifest(settings=['{"guidance_scale": 5}', None, None]),
        [(0, "guidance_scale", "disagrees with settings' guidance_scale 5")],
    ),
    (
        "negative prompt disagrees with settings",
        lambda: manifest(settings=[None, '{"negative_prompt": "dark"}', None]),
        [(1, "negative_prompt", "disagrees")],
    ),
    (
        "duplicate edit_ids",
        lambda: manifest(edit_id=["same", None, "same"]),
        [
            (0, "edit_id", "duplicate edit_id 'same' (also in row 2)"),
            (2, "edit_id", "duplicate edit_id 'same' (also in row 0)"),
        ],
    ),
    (
        "edit_id with a slash",
        lambda: manifest(edit_id=["e0", "a/b", None]),
        [(1, "edit_id", "not key-safe")],
    ),
    (
        "edit_id with dot-dot",
        lambda: manifest(edit_id=["..", "e1", None]),
        [(0, "edit_id", "not key-safe")],
    ),
    (
        "edit_id with a control character",
        lambda: manifest(edit_id=["e0", "e1", "x\ny"]),
        [(2, "edit_id", "not key-safe")],
    ),
    (
        "edit_id too long",
        lambda: manifest(edit_id=["e" * 201, "e1", None]),
        [(0, "edit_id", "longer than 200")],
    ),
    (
        "http URI",
        lambda: manifest(image_uri=["s3://b/a.png", "http://example.com/b.png", "c.png"]),
        [(1, "image_uri", "unsupported URI scheme 'http://'")],
    ),
    (
        "gs URI",
        lambda: manifest(image_uri=["gs://b/a.png", "b.png", "c.png"]),
        [(0, "image_uri", "unsupported URI scheme 'gs://'")],
    ),
    (
        "S3 URI without key",
        lambda: manifest(image_uri=["s3://bucket", "b.png", "c.png"]),
        [(0, "image_uri", "names no object")],
    ),
    ("empty manifest", lambda: manifest().slice(0, 0), [(None, None, "manifest is empty")]),
    (
        "reserved column",
        lambda: manifest(status=["a", "b", "c"]),
        [(None, "status", "reserved for the results table")],
    ),
]


@pytest.mark.parametrize(("factory", "expected"), [pytest.param(f, e, id=i) for i, f, e in CASES])
def test_bad_manifest(
    factory: Callable[[], pa.Table], expected: list[tuple[int | None, str | None, str]]
) -> None:
    problems = validate_table(factory())
    assert [(p.row, p.column) for p in problems] == [(row, col) for row, col, _ in expected], (
        format_problems(problems)
    )
    for problem, (row, _col, reason) in zip(problems, expected, strict=True):
        assert reason in problem.reason
        if row is not None:
            assert str(problem).startswith(f"row {row}, column ")


def test_identical_rows_without_edit_id_are_duplicates() -> None:
    table = pa.table(
        {
            "image_uri": ["x.png", "y.png", "x.png", "x.png"],
            "source_prompt": ["a", "b", "a", "a"],
            "target_prompt": ["c", "d", "c", "c"],
            # row 3 spells the same settings differently and gives the default guidance: still the same edit
            "settings": [
                '{"attn_t": 0.4, "feature_t": 0.7}',
                None,
                '{"feature_t":0.7,"attn_t":0.4}',
                '{"attn_t": 0.4, "feature_t": 0.7, "guidance_scale": 7.5}',
            ],
            "sku": [1, 2, 3, 4],  # passthrough does not make an edit different
        }
    )
    problems = validate_table(table)
    assert [(p.row, p.column) for p in problems] == [(0, "edit_id"), (2, "edit_id"), (3, "edit_id")]
    assert "same edit as rows 2, 3" in problems[0].reason


def test_multiple_problems_all_reported() -> None:
    table = manifest(
        method=["pnp", "nope", None],
        seed=[1.5, None, None],
        num_steps=pa.array([0, 20, None], pa.int64()),
        settings=[None, None, "{bad"],
        image_uri=["ftp://x/a.png", "b.png", "c.png"],
        edit_id=["d", "d", None],
        status=["x", "y", "z"],
        target_prompt=["ok", None, "ok"],
    )
    problems = validate_table(table)
    found = {(p.row, p.column) for p in problems}
    assert found == {
        (None, "status"),
        (0, "image_uri"),
        (0, "edit_id"),
        (0, "seed"),
        (0, "num_steps"),
        (1, "target_prompt"),
        (1, "edit_id"),
        (1, "method"),
        (2, "settings"),
    }
    assert len(problems) == len(found)
    assert [p.row for p in problems] == sorted(
        p.row for p in problems if p.row is not None
    ) or problems[0].row is None
    text = format_problems(problems, limit=3)
    assert text.startswith(
        "9 problem(s) in the manifest (rows are 0-based positions in the manifest):"
    )
    assert "... and 6 more" in text


def test_problem_str() -> None:
    assert str(Problem(3, "seed", "bad")) == "row 3, column 'seed': bad"
    assert str(Problem(None, "seed", "bad")) == "column 'seed': bad"
    assert str(Problem(None, None, "bad")) == "bad"


def test_dictionary_and_large_string_columns_accepted() -> None:
    table = manifest(
        method=pa.array(["pnp", "p2p", None]).dictionary_encode(),
        source_prompt=pa.array(BASE["source_prompt"], pa.large_string()),
        seed=pa.array([1, 2, None], pa.int32()),
        guidance_scale=pa.array([7, None, 3], pa.int16()),
    )
    assert validate_table(table) == []


# ----------------------------------------------------------------------------- loading


def _write_parts(folder: Path, parts: list[pa.Table]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, part in enumerate(parts):
        pq.write_table(part, folder / f"part-{i}.parquet")


def test_load_single_file_and_folder(tmp_path: Path) -> None:
    table = manifest()
    pq.write_table(table, tmp_path / "one.parquet")
    assert load_manifest(str(tmp_path / "one.parquet")).equals(
        table.replace_schema_metadata(None), check_metadata=False
    )

    _write_parts(tmp_path / "folder", [table.slice(0, 2), table.slice(2)])
    (tmp_path / "folder" / "_SUCCESS").write_text("")
    (tmp_path / "folder" / ".hidden.parquet").write_text("not parquet")
    (tmp_path / "folder" / "notes.txt").write_text("ignored")
    loaded = load_manifest(str(tmp_path / "folder"))
    assert loaded.num_rows == 3 and loaded.column("sku").to_pylist() == ["A-1", "A-2", "A-3"]
    assert manifest_files(loaded) == [
        (str(tmp_path / "folder" / "part-0.parquet"), 2),
        (str(tmp_path / "folder" / "part-1.parquet"), 1),
    ]
    assert validate_table(loaded) == []


def test_load_folder_promotes_compatible_types(tmp_path: Path) -> None:
    a = manifest().slice(0, 2)
    b = manifest(
        seed=pa.array([1, 2, 3], pa.int32()),
        source_prompt=pa.array(BASE["source_prompt"], pa.large_string()),
    ).slice(2)
    b = b.select(list(reversed(b.column_names)))  # column order may differ
    _write_parts(tmp_path / "m", [a, b])
    loaded = load_manifest(str(tmp_path / "m"))
    assert loaded.column_names == a.column_names
    assert loaded.column("seed").to_pylist() == [1, 2, 3]


def test_load_folder_with_disagreeing_files(tmp_path: Path) -> None:
    """A file lacking a column is reported, not silently filled with nulls."""
    _write_parts(tmp_path / "m", [manifest(), manifest(seed=None), manifest(seed=["x", "y", "z"])])
    with pytest.raises(ManifestError) as info:
        load_manifest(str(tmp_path / "m"))
    problems = info.value.problems
    assert len(problems) == 2
    assert "part-1.parquet lacks ['seed']" in problems[0].reason
    assert problems[1].column == "seed" and "has type string" in problems[1].reason


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="no manifest file or folder"):
        load_manifest(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManifestError, match="no Parquet files"):
        load_manifest(str(tmp_path / "empty"))
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    prepared = prepare_manifest(str(tmp_path / "bad.parquet"))
    assert prepared.table is None and "cannot read as Parquet" in prepared.problems[0].reason


def test_load_s3_prefix_and_object(s3_bucket: str, s3_server: str) -> None:
    store = open_store(s3_bucket, s3_endpoint=s3_server)
    table = manifest()
    for i, part in enumerate([table.slice(0, 1), table.slice(1)]):
        sink = pa.BufferOutputStream()
        pq.write_table(part, sink)
        store.put(f"manifests/run1/part-{i}.parquet", sink.getvalue().to_pybytes())
    store.put("manifests/run1/_SUCCESS", b"")
    store.put("manifests/run10/other.parquet", b"must not be picked up by the run1 prefix")
    for uri in (f"{s3_bucket}/manifests/run1", f"{s3_bucket}/manifests/run1/"):
        loaded = load_manifest(uri, s3_endpoint=s3_server)
        assert loaded.num_rows == 3 and loaded.column("edit_id").to_pylist() == ["e0", "e1", None]
        assert [name for name, _ in manifest_files(loaded)] == [
            f"{s3_bucket}/manifests/run1/part-0.parquet",
            f"{s3_bucket}/manifests/run1/part-1.parquet",
        ]
    single = load_manifest(f"{s3_bucket}/manifests/run1/part-1.parquet", s3_endpoint=s3_server)
    assert single.num_rows == 2
    prepared = prepare_manifest(f"{s3_bucket}/manifests/run1", s3_endpoint=s3_server)
    assert prepared.problems == [] and prepared.normalized.num_rows == 3
    with pytest.raises(ManifestError, match="no Parquet files"):
        load_manifest(f"{s3_bucket}/manifests/none/", s3_endpoint=s3_server)


def test_duplicate_column_names_and_all_null_optional_columns() -> None:
    base = manifest(method=pa.nulls(3), settings=pa.nulls(3), edit_id=pa.nulls(3))
    assert validate_table(base) == []  # all-null optional columns = defaults
    doubled = pa.Table.from_arrays(
        [*base.columns, base.column("seed")], names=[*base.column_names, "seed"]
    )
    assert [(p.row, p.column, p.reason) for p in validate_table(doubled)] == [
        (None, "seed", "column appears 2 times")
    ]


def test_empty_manifest_reports_columns_too() -> None:
    empty = pa.table({"image_uri": pa.array([], pa.string())})
    assert [(p.row, p.column) for p in validate_table(empty)] == [
        (None, None),
        (None, "source_prompt"),
        (None, "target_prompt"),
    ]
