"""Manifest validation accepts PnP's `source_text` setting (issue 10) with no change to manifests/."""

from __future__ import annotations

import pyarrow as pa

from manifests import validate_table


def _table(method: str, settings: str) -> pa.Table:
    return pa.table(
        {
            "image_uri": ["images/a.png"],
            "source_prompt": ["a red circle on a gray background"],
            "target_prompt": ["a blue circle on a gray background"],
            "method": [method],
            "settings": [settings],
        }
    )


def test_pnp_source_text_is_a_valid_setting() -> None:
    assert validate_table(_table("pnp", '{"source_text": "empty"}')) == []
    assert validate_table(_table("pnp", '{"source_text": "source", "feature_t": 0.7}')) == []


def test_bad_or_misplaced_source_text_is_reported() -> None:
    [problem] = validate_table(_table("pnp", '{"source_text": "blank"}'))
    assert (problem.row, problem.column) == (0, "settings")
    assert "source_text must be one of" in problem.reason and "'blank'" in problem.reason
    [problem] = validate_table(_table("p2p", '{"source_text": "empty"}'))  # a PnP-only setting
    assert "unknown p2p setting(s) ['source_text']" in problem.reason
