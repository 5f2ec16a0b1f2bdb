"""Prompt length against a model's tokenizer, checked without loading the model's weights.

Used before a run (``editflow validate --model``, planning) so that a prompt that does not fit the
model's text encoder is reported with its row before any image is edited.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from editing.model import model_folder


@dataclass(frozen=True)
class PromptBudget:
    """How many tokens a model's text encoder takes, and a counter for prompts."""

    max_tokens: int  # including the start and end tokens, as the tokenizer's model_max_length
    tokenizer: object  # a transformers CLIPTokenizer(-Fast)

    def counts(self, prompts: Sequence[str]) -> list[int]:
        """Token count of each prompt, start and end tokens included."""
        if not prompts:
            return []
        encoded = self.tokenizer(list(prompts), truncation=False, verbose=False)
        return [len(ids) for ids in encoded.input_ids]


def prompt_budget(source: str | os.PathLike[str]) -> PromptBudget:
    """The tokenizer of the checkpoint at `source` (folder or cached hub id) and its token limit."""
    from transformers import CLIPTokenizer

    folder = model_folder(source)
    tokenizer_dir = Path(folder) / "tokenizer"
    if not tokenizer_dir.is_dir():
        raise ValueError(f"model {str(source)!r} has no tokenizer/ folder")
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    return PromptBudget(int(tokenizer.model_max_length), tokenizer)
