"""Hostile and sloppy manifests: `validate` refuses what the run would refuse (or misread), naming
the row, the field and the problem; restyle's bad inputs are one clear error, and nothing is left."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from editing.prompts import prompt_budget
from manifests import ManifestError, prepare_table, restyle_manifest, validate_table
from manifests.validate import SETTINGS_MAX_BYTES, SETTINGS_MAX_DEPTH
from refmodel import REFERENCE_MODEL_DIR

from .helpers import cli_output

pytestmark = pytest.mark.bad_input

SOURCE = "a red circle on a gray background"
TARGET = "a green circle on a gray background"


def _row(**kw) -> dict:
    return {"image_uri": "a.png", "source_prompt": SOURCE, "target_prompt": TARGET} | kw


def _table(rows: list[dict]) -> pa.Table:
    """The rows as a table with every column any row has (``from_pylist`` keeps only the first's)."""
    names = list(dict.fromkeys(k for r in rows for k in r))
    return pa.Table.from_pylist([{k: r.get(k) for k in names} for r in rows])


def _write(path: Path, rows: list[dict]) -> str:
    pq.write_table(_table(rows), path)
    return str(path)


def _problems(rows: list[dict]) -> list[tuple[int | None, str | None, str]]:
    return [(p.row, p.column, p.reason) for p in validate_table(_table(rows))]


@pytest.fixture(scope="module")
def budget():
    return prompt_budget(REFERENCE_MODEL_DIR)


# ---- edit ids that could spoof names in listings and reports


@pytest.mark.parametrize(
    "edit_id",
    ["e\u202eevil", "a\u200bb", "\ufeffbom", " lead", "trail ", "tab\t", "\u3000wide", ".hidden",
     "line\u2028sep"],
)  # fmt: skip
def test_spoofing_edit_ids_are_refused_with_their_row(edit_id: str) -> None:
    problems = _problems([_row(edit_id="fine"), _row(edit_id=edit_id, target_prompt="a cat")])
    assert [(row, col) for row, col, _ in problems] == [(1, "edit_id")]
    assert repr(edit_id)[1:-1] in problems[0][2] or "not key-safe" in problems[0][2]


@pytest.mark.parametrize("edit_id", ["ok-1", "a.b", "été", "猫_3", "x y"])
def test_ordinary_edit_ids_stay_valid(edit_id: str) -> None:
    assert _problems([_row(edit_id=edit_id)]) == []


# ---- image URIs with control characters


@pytest.mark.parametrize(
    "uri", ["img\x00.png", "s3://b/k\x00ey.png", "a\nb.png", "file:///x/\x1b.png"]
)
def test_control_characters_in_image_uri_are_refused(uri: str) -> None:
    problems = _problems([_row(), _row(image_uri=uri)])
    assert [(row, col) for row, col, _ in problems] == [(1, "image_uri")]
    assert "control character" in problems[0][2]


# ---- settings: duplicate keys, depth and size


def test_duplicate_settings_keys_are_refused() -> None:
    problems = _problems([_row(settings='{"feature_t":0.5,"feature_t":0.9}')])
    assert [(row, col) for row, col, _ in problems] == [(0, "settings")]
    assert "the key 'feature_t' twice" in problems[0][2]
    nested = _problems([_row(method="p2p", settings='{"equalizer":{"green":2,"green":3}}')])
    assert "the key 'green' twice" in nested[0][2]


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("[" * 100_000 + "]" * 100_000, f"at most {SETTINGS_MAX_BYTES} are allowed"),
        ("[" * 20_000 + "]" * 20_000, f"nests 20000 levels deep; at most {SETTINGS_MAX_DEPTH}"),
        ('{"a":' * 40 + "1" + "}" * 40, "nests 40 levels deep"),
    ],
    ids=["100k deep", "20k deep", "40 deep"],
)
def test_deep_or_huge_settings_are_refused_without_recursion(text: str, why: str) -> None:
    problems = _problems([_row(), _row(settings=text, target_prompt="a cat")])
    assert [(row, col) for row, col, _ in problems] == [(1, "settings")]
    assert why in problems[0][2]


def test_brackets_inside_strings_do_not_count_as_depth() -> None:
    text = '{"equalizer": {"' + "[" * 100 + '": 1}}'
    problems = _problems([_row(method="p2p", settings=text)])
    assert problems == []  # the word is checked against the prompt only with the model's tokenizer


# ---- all-null optional columns written by pandas


def test_all_null_method_and_other_optional_columns_from_pandas_mean_the_defaults(
    tmp_path: Path,
) -> None:
    path = tmp_path / "m.parquet"
    frame = pd.DataFrame([_row(), _row(target_prompt="a cat")])
    frame["method"] = float("nan")  # float64 of NaNs, as pandas writes an empty column
    frame["edit_id"] = float("nan")
    frame["settings"] = float("nan")
    frame["negative_prompt"] = float("nan")
    frame.to_parquet(path, index=False)
    assert pq.read_schema(path).field("method").type == pa.float64()
    prepared = prepare_table(pq.read_table(path))
    assert prepared.problems == []
    norm = prepared.require_normalized()
    assert norm.column("method").to_pylist() == ["pnp", "pnp"]
    assert all(len(e) == 32 for e in norm.column("edit_id").to_pylist())


def test_an_all_null_required_column_is_still_refused() -> None:
    table = pa.table({"image_uri": pa.array([None, None], pa.float64()),
                      "source_prompt": [SOURCE] * 2, "target_prompt": [TARGET] * 2})  # fmt: skip
    problems = validate_table(table)
    assert [(p.row, p.column) for p in problems] == [(None, "image_uri")]
    assert "must be a string column" in problems[0].reason


# ---- P2P words that are not in the prompt, with the model's tokenizer


@pytest.mark.parametrize(
    ("settings", "field", "word", "column"),
    [
        ('{"equalizer": {"blue": 2.0}}', "equalizer", "blue", "target_prompt"),
        ('{"cross_replace_steps": {"default_": 0.8, "purple": 0.5}}', "cross_replace_steps",
         "purple", "target_prompt"),
        ('{"blend_source_words": ["square"], "blend_target_words": ["circle"]}',
         "blend_source_words", "square", "source_prompt"),
        ('{"blend_source_words": ["circle"], "blend_target_words": ["red"]}',
         "blend_target_words", "red", "target_prompt"),
    ],
)  # fmt: skip
def test_p2p_words_absent_from_their_prompt_are_refused(
    budget, settings: str, field: str, word: str, column: str
) -> None:
    good = _row(method="p2p", settings='{"equalizer": {"green": 2.0}}')
    table = _table([good, _row(method="p2p", settings=settings)])
    problems = prepare_table(table, budget=budget, normalize=False).problems
    assert [(p.row, p.column) for p in problems] == [(1, "settings")]
    assert f"{field} names the word {word!r}" in problems[0].reason
    assert f"not in the {column}" in problems[0].reason


def test_words_present_in_the_prompt_pass(budget) -> None:
    settings = ('{"equalizer": {"green": 2, "circle,": 1}, "cross_replace_steps": {"default_": 0.8, '
                '"green": 0.4}, "blend_source_words": ["red"], "blend_target_words": ["green"]}')  # fmt: skip
    table = _table([_row(method="p2p", settings=settings)])
    assert prepare_table(table, budget=budget, normalize=False).problems == []


def test_validate_cli_refuses_what_the_run_would(tmp_path: Path, capsys) -> None:
    rows = [
        _row(edit_id="ok"),
        _row(edit_id="e\u202eevil", target_prompt="a cat"),
        _row(image_uri="x\x00.png", edit_id="nul"),
        _row(edit_id="dup", settings='{"feature_t":0.5,"feature_t":0.9}'),
        _row(edit_id="deep", settings="[" * 100_000 + "]" * 100_000),
    ]
    code, text = cli_output(["validate", _write(tmp_path / "m.parquet", rows)], capsys)
    assert code == 2, text
    for needle in ("row 1, column 'edit_id'", "row 2, column 'image_uri'",
                   "row 3, column 'settings'", "row 4, column 'settings'"):  # fmt: skip
        assert needle in text, text
    assert "Traceback" not in text
    words = [_row(method="p2p", settings='{"equalizer": {"blue": 2.0}}')]
    code, text = cli_output(["validate", _write(tmp_path / "w.parquet", words)], capsys)
    assert code == 2 and "row 0, column 'settings': equalizer names the word 'blue'" in text, text


# ---- restyle's inputs


CATALOG = pa.table({"image_uri": ["a.png", "b.png"], "caption": ["a red circle", "a cat"]})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"template": "{caption} {foo}"}, r"template '\{caption\} \{foo\}' uses unknown field\(s\) \['foo'\]"),
        ({"template": "{caption"}, r"template '\{caption' is malformed"),
        ({"template": "{caption:d}"}, r"cannot be filled for catalog row 0"),
        ({"caption_column": "nope"}, "catalog has no caption column 'nope'"),
        ({"styles": [""]}, r"non-empty strings, got \[''\]"),
    ],
)  # fmt: skip
def test_restyle_bad_arguments_are_manifest_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ManifestError, match=match) as info:
        restyle_manifest(CATALOG, **({"styles": ["in watercolor"]} | kwargs))
    assert len(info.value.problems) == 1


def test_restyle_bad_catalog_files_are_manifest_errors(tmp_path: Path) -> None:
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes("image_uri,caption\na.png,caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(ManifestError, match=r"latin1.csv' is not UTF-8 text \(byte 27: b'\\xe9'\)"):
        restyle_manifest(latin1, ["in watercolor"])
    with pytest.raises(ManifestError, match=r"catalog '.*missing.csv' does not exist"):
        restyle_manifest(tmp_path / "missing.csv", ["in watercolor"])
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet")
    with pytest.raises(ManifestError, match="broken.parquet' cannot be read as Parquet"):
        restyle_manifest(broken, ["in watercolor"])


@pytest.mark.parametrize(
    "extra",
    [["--caption-column", "nope"], ["--template", "{caption"], ["--style", ""]],
    ids=["caption column", "template", "empty style"],
)
def test_restyle_cli_bad_inputs_exit_2_and_leave_no_out_folder(
    tmp_path: Path, capsys, prefect_server, flow_model, extra: list[str]
) -> None:
    catalog = tmp_path / "catalog.csv"
    catalog.write_text("image_uri,caption\na.png,a red circle\n")
    out = tmp_path / "out"
    argv = ["restyle", str(catalog), "--style", "in watercolor", *extra, "--out", str(out),
            "--model", flow_model]  # fmt: skip
    code, text = cli_output(argv, capsys)
    assert code == 2, text
    assert "Traceback" not in text
    assert not out.exists(), sorted(p.name for p in out.rglob("*"))
