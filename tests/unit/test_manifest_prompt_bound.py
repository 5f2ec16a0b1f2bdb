"""The cheap prompt-length bound (manifests.prompts.surely_fits) against the real tokenizer of the
reference model (refmodel/shapes-v2, 16 tokens): a prompt it lets through untokenised never
exceeds the limit, and the problems found equal those of tokenising every prompt."""

from __future__ import annotations

import random
import string

import pyarrow as pa
import pytest

from editing.prompts import prompt_budget
from manifests.prompts import prompt_problems, surely_fits
from refmodel import REFERENCE_MODEL_DIR

TRICKY = [
    "!!!!!!!!!!!!!!",  # a punctuation run: one pre-token, up to one token per character
    "..,,;;::''\"\"!?",
    "12345678901234",  # digits: each its own pre-token
    "abcdefghijklmn",  # a long word of rare pairs
    "a" * 14,
    "a" * 15,  # one over the bound
    "x" * 40,
    "a b c d e f g h i j k l m n",  # 14 one-letter words
    "a b c d e f g h i j k l m n o",
    "a\tb\nc\fd\re\vf",  # whitespace other than spaces counts as characters (safe)
    "\x1c\x1d\x1e\x1f",  # separators Python calls whitespace: counted, never dropped by the bound
    "a\x00b\x7f",
    "it's they're we'll",  # the tokenizer's contractions
    "<|startoftext|>",  # a special token spelt out
    "&amp;&amp;&amp;",
    "ünïcode",  # non-ASCII: more tokens than characters, so always tokenised
    "日本語",
    "café",
    "   ",
    "",
    "a red circle",
    "a yellow triangle on a black background in a very long watercolor style",
]


@pytest.fixture(scope="module")
def budget():
    return prompt_budget(REFERENCE_MODEL_DIR)


def _random_prompts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    alphabet = string.printable + "\x00\x0b\x1c\x1f\x7f" + "éü日"
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))) for _ in range(n)]


def test_prompts_the_bound_lets_through_fit(budget) -> None:
    prompts = TRICKY + _random_prompts(3000, seed=0)
    fits = surely_fits(pa.array(prompts), budget.max_tokens)
    counts = budget.counts(prompts)
    through = [(p, c) for p, c, f in zip(prompts, counts, fits, strict=True) if f]
    assert len(through) > 100  # the bound does let short prompts through
    too_long = [(p, c) for p, c in through if c > budget.max_tokens]
    assert too_long == []


def test_the_bound_at_the_limit(budget) -> None:
    """14 ASCII characters besides spaces (16 - start - end) pass; 15 are tokenised."""
    limit = budget.max_tokens - 2
    at, over = "!" * limit, "!" * (limit + 1)
    spaced = " ".join(at)  # spaces are free
    assert surely_fits(pa.array([at, over, spaced, "é", None]), budget.max_tokens).tolist() == [
        True,
        False,
        True,
        False,
        True,  # a missing prompt is nothing to check
    ]
    assert budget.counts([at, over, spaced]) == [budget.max_tokens, budget.max_tokens + 1, 16]


def test_problems_equal_tokenising_everything(budget) -> None:
    prompts = TRICKY + _random_prompts(2000, seed=1)
    columns = {"target_prompt": pa.array(prompts), "negative_prompt": pa.array(prompts[::-1])}
    found = [(p.row, p.column, p.reason) for p in prompt_problems(columns, budget)]
    expected = []
    for name, column in columns.items():
        for row, (prompt, count) in enumerate(
            zip(column.to_pylist(), budget.counts(column.to_pylist()), strict=True)
        ):
            if prompt and count > budget.max_tokens:
                expected.append((row, name, count))
    expected.sort(key=lambda e: (e[0], e[1]))
    assert [(r, c) for r, c, _ in found] == [(r, c) for r, c, _ in expected]
    assert all(
        f"{n} tokens, the model takes 16" in reason
        for (_, _, reason), (_, _, n) in zip(found, expected)
    )
    assert len(found) > 500


def test_only_unsure_prompts_are_tokenised(budget) -> None:
    class Counting:
        max_tokens = budget.max_tokens

        def __init__(self) -> None:
            self.seen: list[str] = []

        def counts(self, prompts):
            self.seen += prompts
            return budget.counts(prompts)

    counting = Counting()
    column = pa.array(["a red circle"] * 1000 + ["a blue square"] * 1000 + ["x" * 20, "ünï"])
    assert [p.row for p in prompt_problems({"target_prompt": column}, counting)] == [2000]
    assert sorted(counting.seen) == sorted(["x" * 20, "ünï"])
