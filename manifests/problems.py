"""What is wrong with a manifest: `Problem` (row, column, reason), `ManifestError` and the report text.

Row numbers are 0-based positions in the manifest (the files of a folder concatenated in name order).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Problem",
    "ManifestError",
    "format_problems",
    "problem_kind",
    "show_value",
    "rows_text",
]

_OTHERS_SHOWN = 5  # rows named in a duplicate message


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a manifest."""

    row: int | None  # 0-based position in the manifest; None = the whole manifest or column
    column: str | None  # None = not about one column
    reason: str

    def __str__(self) -> str:
        where = []
        if self.row is not None:
            where.append(f"row {self.row}")
        if self.column is not None:
            where.append(f"column {self.column!r}")
        return (", ".join(where) + ": " if where else "") + self.reason


class ManifestError(ValueError):
    """A manifest that cannot be used; ``problems`` lists every reason.

    Pickles with its problems (it crosses process boundaries when a Dask worker plans a run).
    """

    def __init__(
        self,
        problems: list[Problem],
        total: int | None = None,
        counts: dict[str, int] | None = None,
    ) -> None:
        self.problems = list(problems)
        self.total = len(self.problems) if total is None else total  # all, listed or not
        self.counts = counts  # per kind (column), all problems; None = count the listed ones
        super().__init__(format_problems(self.problems, total=self.total, counts=counts))

    def __reduce__(self) -> tuple[Any, ...]:
        # The default would rebuild from ``args`` (the report text), losing the problems.
        return (type(self), (self.problems, self.total, self.counts))


def problem_kind(problem: Problem) -> str:
    """What a problem is counted under: its column, or "(manifest)"."""
    return problem.column or "(manifest)"


def format_problems(
    problems: list[Problem],
    *,
    limit: int = 50,
    total: int | None = None,
    counts: dict[str, int] | None = None,
) -> str:
    """A readable report: a count, up to `limit` problems, and counts per column beyond that.

    A streaming check lists only the first problems: `total` is the count of all of them and
    `counts` their count per kind (:func:`problem_kind`), listed or not."""
    total = len(problems) if total is None else total
    if not total:
        return "manifest is valid"
    lines = [f"{total} problem(s) in the manifest (rows are 0-based positions in the manifest):"]
    shown = problems[:limit]
    lines += [f"  {p}" for p in shown]
    if total > len(shown):
        rest = Counter(counts) if counts is not None else Counter(map(problem_kind, problems))
        rest.subtract(Counter(map(problem_kind, shown)))
        summary = ", ".join(f"{col}: {count}" for col, count in rest.most_common() if count > 0)
        lines.append(f"  ... and {total - len(shown)} more ({summary})")
    return "\n".join(lines)


def show_value(value: Any, width: int = 60) -> str:
    """``repr(value)``, cut to `width` characters (for messages)."""
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def rows_text(rows: list[int]) -> str:
    """'row 3' or 'rows 3, 7 and 12 more'."""
    shown = ", ".join(str(r) for r in rows[:_OTHERS_SHOWN])
    more = len(rows) - _OTHERS_SHOWN
    return (
        ("row " if len(rows) == 1 else "rows ") + shown + (f" and {more} more" if more > 0 else "")
    )
