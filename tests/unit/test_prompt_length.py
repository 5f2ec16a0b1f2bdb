"""A prompt that does not fit the model's text encoder is reported before the run, with its row."""

from __future__ import annotations

import pandas as pd
import pyarrow as pa
import pytest

from editing.prompts import prompt_budget
from flows.cli import main
from manifests import prompt_length_problems
from refmodel import REFERENCE_MODEL_DIR

SOURCE = "a yellow triangle on a black background"
LONG = "a yellow triangle on a black background in a very very very long watercolor style"


@pytest.fixture(scope="module")
def budget():
    return prompt_budget(REFERENCE_MODEL_DIR)


def test_budget_counts_start_and_end_tokens(budget) -> None:
    assert budget.max_tokens == 16
    assert budget.counts(["a red circle"]) == [5]  # <start> a red circle <end>
    assert budget.counts([]) == []


def test_too_long_prompts_are_named_by_row_and_column(budget) -> None:
    table = pa.table(
        {
            "image_uri": ["a.png"] * 4,
            "source_prompt": [SOURCE, LONG, SOURCE, None],
            "target_prompt": [LONG, SOURCE, "a red circle", LONG],
            "negative_prompt": [None, None, LONG, None],
        }
    )
    problems = prompt_length_problems(table, budget)
    assert [(p.row, p.column) for p in problems] == [
        (0, "target_prompt"),
        (1, "source_prompt"),
        (2, "negative_prompt"),
        (3, "target_prompt"),
    ]
    assert all("too long for the model" in p.reason and "takes 16" in p.reason for p in problems)
    assert prompt_length_problems(table.slice(2, 0), budget) == []


def _manifest(tmp_path, target: str):
    path = tmp_path / "m.parquet"
    pd.DataFrame(
        {
            "image_uri": ["manifests/examples/images/scene-0.png"],
            "source_prompt": [SOURCE],
            "target_prompt": [target],
        }
    ).to_parquet(path, index=False)
    return path


def test_validate_reports_a_too_long_prompt(tmp_path, capsys) -> None:
    assert main(["validate", str(_manifest(tmp_path, LONG))]) == 2
    out = capsys.readouterr().out
    assert "row 0, column 'target_prompt': prompt is too long" in out
    assert main(["validate", str(_manifest(tmp_path, "a purple triangle"))]) == 0


def test_run_refuses_a_too_long_prompt_before_starting(tmp_path, capsys) -> None:
    out = tmp_path / "out"
    assert main(["run", str(_manifest(tmp_path, LONG)), "--out", str(out)]) == 2
    assert "prompt is too long" in capsys.readouterr().out
    assert not out.exists()  # nothing was planned or written


def test_restyle_refuses_a_style_that_does_not_fit_before_starting(tmp_path, capsys) -> None:
    out = tmp_path / "out"
    argv = ["restyle", "manifests/examples/catalog.csv", "--out", str(out)]
    assert main([*argv, "--style", "in a very very long watercolor style"]) == 2
    text = capsys.readouterr().out
    assert "prompt is too long" in text and "catalog row 2" in text
    assert not out.exists()
