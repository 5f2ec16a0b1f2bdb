"""Prompt lengths: rows whose prompt does not fit the model's text encoder.

Only prompts that might not fit are tokenised. CLIP's tokenizer drops whitespace, splits the rest
into pre-tokens and byte-pair-encodes each one into at most one token per byte (every merge joins
two pieces), and adds a start and an end token. So an ASCII prompt with at most ``max_tokens - 2``
characters other than spaces always fits; a million-row manifest of short prompts costs a few
vectorised passes, and only the other distinct prompts go through the tokenizer.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from manifests.problems import Problem, show_value
from manifests.validate import RowValues, is_string_type

__all__ = [
    "PROMPT_COLUMNS",
    "surely_fits",
    "prompt_problems",
    "prompt_length_problems",
    "word_problems",
]

PROMPT_COLUMNS = ("source_prompt", "target_prompt", "negative_prompt")


def surely_fits(prompts: pa.Array | pa.ChunkedArray, max_tokens: int) -> np.ndarray:
    """Per prompt: True when it cannot exceed `max_tokens` (start and end included) without
    tokenising it (ASCII, at most ``max_tokens - 2`` characters other than spaces); null = True."""
    # Spaces are not counted (the tokenizers drop them); other whitespace, rare in prompts, counts
    # as a character, which only overestimates (a regex over every prompt would cost seconds).
    ascii_ = pc.string_is_ascii(prompts)
    chars = pc.subtract(pc.binary_length(prompts), pc.count_substring(prompts, " "))
    fits = pc.and_kleene(ascii_, pc.less_equal(chars, max_tokens - 2))
    return np.asarray(
        pc.fill_null(fits, pc.is_null(prompts)).to_numpy(zero_copy_only=False), dtype=bool
    )


def prompt_problems(
    columns: Mapping[str, pa.Array | pa.ChunkedArray], budget: Any
) -> list[Problem]:
    """Rows whose prompt does not fit, for each prompt column of `columns` (strings), by row.

    `budget` is an :class:`editing.prompts.PromptBudget` (``max_tokens`` and ``counts(prompts)``).
    Each distinct prompt that might not fit (see :func:`surely_fits`) is tokenised once.
    """
    problems: list[Problem] = []
    for name in PROMPT_COLUMNS:
        column = columns.get(name)
        if column is None:
            continue
        column = column.cast(pa.string())
        unsure = column.filter(pa.array(~surely_fits(column, budget.max_tokens)))
        distinct = [p for p in pc.unique(unsure).to_pylist() if p]
        counts = dict(zip(distinct, budget.counts(distinct), strict=True))
        too_long = [p for p in distinct if counts[p] > budget.max_tokens]
        if not too_long:
            continue
        rows = np.flatnonzero(
            pc.fill_null(pc.is_in(column, value_set=pa.array(too_long)), False).to_numpy(
                zero_copy_only=False
            )
        )
        values = column.take(pa.array(rows)).to_pylist()
        for row, prompt in zip(rows.tolist(), values, strict=True):
            problems.append(
                Problem(
                    row,
                    name,
                    f"prompt is too long for the model: {counts[prompt]} tokens, the model takes "
                    f"{budget.max_tokens} (start and end tokens included): {show_value(prompt)}",
                )
            )
    problems.sort(key=lambda p: (p.row, p.column))
    return problems


def prompt_length_problems(table: pa.Table, budget: Any) -> list[Problem]:
    """:func:`prompt_problems` of a table's string prompt columns (other columns are skipped).

    ``manifests.prepare_manifest(uri, budget=...)`` checks prompt lengths in the same pass as the
    rest; this is for a table at hand.
    """
    columns = {
        name: table.column(name)
        for name in PROMPT_COLUMNS
        if name in table.column_names and is_string_type(table.schema.field(name).type)
    }
    return prompt_problems(columns, budget)


# Prompt-to-Prompt settings that name words of a prompt: (setting, the prompt column they name).
WORD_SETTINGS = (
    ("equalizer", "target_prompt"),
    ("cross_replace_steps", "target_prompt"),
    ("blend_source_words", "source_prompt"),
    ("blend_target_words", "target_prompt"),
)


def _named_words(settings: dict[str, Any]) -> list[tuple[str, str, list[str]]]:
    """(setting, prompt column, words) for each P2P setting of `settings` that names words."""
    out = []
    for name, column in WORD_SETTINGS:
        value = settings.get(name)
        if isinstance(value, Mapping):
            words = [w for w in value if w != "default_"]  # cross_replace_steps' own default
        elif isinstance(value, list):
            words = list(value)
        else:
            continue
        if words:
            out.append((name, column, words))
    return out


def word_problems(arrays: Mapping[str, pa.Array], values: RowValues, budget: Any) -> list[Problem]:
    """P2P rows whose settings name a word (equalizer, cross_replace_steps, local blend) that is not
    in the prompt it belongs to, by row; found with the engine's own word-to-token alignment
    (``editing.alignment.positions_of``) and `budget`'s tokenizer, so validation and the run agree.
    Each distinct (prompt, word) is looked up once."""
    slots = {}
    for slot, text in enumerate(values.settings_identity):
        if any(f'"{name}"' in text for name, _ in WORD_SETTINGS):
            named = _named_words(json.loads(text))
            if named:
                slots[slot] = named
    if not slots:
        return []
    from editing.alignment import positions_of  # torch: only when some row names words

    method = np.asarray(pc.equal(values.method, "p2p").fill_null(False), dtype=bool)
    rows = np.flatnonzero(method & np.isin(values.settings_codes, list(slots)))
    take = pa.array(rows)
    prompts = {c: arrays[c].take(take).to_pylist() for c in ("source_prompt", "target_prompt")}
    seen: dict[tuple[str, str], str | None] = {}
    problems: list[Problem] = []
    for i, row in enumerate(rows.tolist()):
        for name, column, words in slots[int(values.settings_codes[row])]:
            prompt = prompts[column][i]
            for word in words:
                if (prompt, word) not in seen:
                    try:
                        positions_of(budget.tokenizer, prompt, [word])
                        seen[prompt, word] = None
                    except ValueError as exc:
                        seen[prompt, word] = str(exc)
                error = seen[prompt, word]
                if error is not None:
                    problems.append(
                        Problem(
                            row,
                            "settings",
                            f"{name} names the word {word!r}, which is not in the {column} "
                            f"{show_value(prompt)} (words as the model's tokenizer splits them)",
                        )
                    )
    return problems
