"""The manifest's ``qa_contrast`` column (the edit-QA judge's contrast prompts): read as a "|"-separated
string or a list of strings, checked with the manifest (row, column and what is wrong), also when a
manifest is streamed in batches; tests/tasks/test_qa_shard.py follows it through a run to the judge."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from manifests import validate_table
from manifests.schema import QA_CONTRAST_MAX, contrast_prompts
from manifests.stream import ManifestScan, open_manifest

BASE = {
    "image_uri": ["a.png", "b.png", "c.png"],
    "source_prompt": ["a red circle", "a blue square", "a red circle"],
    "target_prompt": ["a green circle", "a blue triangle", "a yellow circle"],
}


@pytest.mark.parametrize(
    "value, prompts",
    [
        (None, ()),
        ("", ()),
        ("a red circle", ("a red circle",)),
        (" a red circle | a blue circle ", ("a red circle", "a blue circle")),
        (["a red circle", " a blue circle"], ("a red circle", "a blue circle")),
        ([], ()),
    ],
)
def test_contrast_prompts_are_read_from_a_string_or_a_list(value, prompts):
    assert contrast_prompts(value) == prompts


def _problems(values, type_=None) -> list[str]:
    table = pa.table(BASE | {"qa_contrast": pa.array(values, type_)})
    return [str(p) for p in validate_table(table)]


def test_good_contrast_columns_pass():
    assert _problems(["a red circle|a blue circle", None, ""]) == []
    assert _problems([["a red circle"], None, []], pa.list_(pa.string())) == []
    assert _problems([None, None, None]) == []  # all missing: judged against the source prompt


def test_bad_contrast_values_name_the_row_the_column_and_the_problem():
    assert _problems(["a red circle||a blue circle", None, "|"]) == [
        "row 0, column 'qa_contrast': prompt 2 of 3 is empty",
        "row 2, column 'qa_contrast': prompt 1 of 2 is empty",
    ]
    assert _problems([None, ["a red circle", None], ["x"]], pa.list_(pa.string())) == [
        "row 1, column 'qa_contrast': prompt 2 is not a string: None"
    ]
    many = "|".join(f"a circle {i}" for i in range(QA_CONTRAST_MAX + 1))
    assert _problems([None, None, many]) == [
        f"row 2, column 'qa_contrast': has {QA_CONTRAST_MAX + 1} prompts; at most {QA_CONTRAST_MAX}"
    ]
    assert _problems([1, 2, 3]) == [
        "column 'qa_contrast': must be a string column ('|'-separated prompts) or a list of "
        "strings, got int64"
    ]


def test_a_streamed_manifest_reports_each_bad_row_once_with_its_manifest_position(tmp_path):
    n = 5
    table = pa.table(
        {k: v[:1] * n for k, v in BASE.items()}
        | {"edit_id": [f"e{i}" for i in range(n)], "qa_contrast": ["ok", "ok", "ok", "a||b", "ok"]}
    )
    pq.write_table(table, tmp_path / "m.parquet")
    scan = ManifestScan(open_manifest(str(tmp_path / "m.parquet")), batch_rows=2)
    for _ in scan.batches():
        pass
    scan.finish()
    assert [str(p) for p in scan.problems] == [
        "row 3, column 'qa_contrast': prompt 2 of 3 is empty"
    ]
    # a column of the wrong type: said once, not per batch
    pq.write_table(
        table.set_column(table.column_names.index("qa_contrast"), "qa_contrast", pa.array([1] * n)),
        tmp_path / "m.parquet",
    )
    scan = ManifestScan(open_manifest(str(tmp_path / "m.parquet")), batch_rows=2)
    for _ in scan.batches():
        pass
    assert [p.row for p in scan.problems] == [None]
