"""One pass over a manifest: load it once, check it once, normalise it from that same check.

prepared = prepare_manifest("s3://bucket/manifests/", s3_endpoint=endpoint, budget=budget)
rows = list(edit_rows(prepared.require_normalized()))  # ManifestError lists every problem
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from manifests.load import load_manifest, manifest_files
from manifests.normalise import normalized_table, passthrough_columns
from manifests.problems import ManifestError, Problem
from manifests.prompts import prompt_problems, word_problems
from manifests.validate import analyse

__all__ = ["PreparedManifest", "prepare_manifest", "prepare_table"]


@dataclass(frozen=True, slots=True)
class PreparedManifest:
    """A manifest loaded, checked and (when it has no problems) normalised, once."""

    table: pa.Table | None  # as loaded (None when it could not be loaded)
    problems: list[Problem]  # loading problems, else column/row problems, else prompt lengths
    normalized: pa.Table | None  # the normalised table; None when there are problems
    passthrough: list[str]  # passthrough column names
    files: list[tuple[str, int]]  # (file URI, rows) in row order

    def require_normalized(self) -> pa.Table:
        """The normalised table; :class:`ManifestError` listing the problems if there are any."""
        if self.problems or self.normalized is None:
            raise ManifestError(self.problems)
        return self.normalized


def prepare_table(
    table: pa.Table,
    *,
    budget: Any = None,
    normalize: bool = True,
) -> PreparedManifest:
    """Check `table` once and normalise it from that check.

    `budget` (an :class:`editing.prompts.PromptBudget`) adds prompt-length problems after the
    others, then P2P settings naming words that are not in their prompt (with the model's
    tokenizer); they are looked for only when the table is otherwise valid. ``normalize=False`` skips
    the normalised table (a check only).
    """
    analysis = analyse(table)
    problems = list(analysis.problems)
    if budget is not None and not problems:
        problems += prompt_problems(analysis.arrays, budget)
    if budget is not None and not problems and analysis.values is not None:
        problems += word_problems(analysis.arrays, analysis.values, budget)
    normalized = normalized_table(table, analysis) if normalize and not problems else None
    return PreparedManifest(
        table=table,
        problems=problems,
        normalized=normalized,
        passthrough=passthrough_columns(table),
        files=manifest_files(table),
    )


def prepare_manifest(
    uri: str, *, s3_endpoint: str | None = None, budget: Any = None, normalize: bool = True
) -> PreparedManifest:
    """Load the manifest at `uri` once (file, folder or S3 prefix), check it once and normalise
    it from that check. A manifest that cannot be loaded gives ``table=None`` and the loading
    problems; see :func:`prepare_table` for `budget` and `normalize`."""
    try:
        table = load_manifest(uri, s3_endpoint=s3_endpoint)
    except ManifestError as exc:
        return PreparedManifest(None, exc.problems, None, [], [])
    return prepare_table(table, budget=budget, normalize=normalize)
