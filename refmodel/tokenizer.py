"""A CLIP-style BPE tokenizer whose vocabulary is the caption words of the shapes domain.

Every word is one token ("red</w>") except the words in SPLIT_WORDS, which become two
sub-tokens ("turquoise" -> "turqu" + "oise</w>"), so edits can exercise words of unequal
token counts. The merges are built and checked so that each word tokenizes exactly as intended.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from transformers import CLIPTokenizer

from refmodel.domain import caption_words

logger = logging.getLogger(__name__)

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"  # also the pad and unknown token, as in SD 1.x
MODEL_MAX_LENGTH = (
    16  # tokens; longest caption is 11. Short, so attention is not diluted by padding
)
END_OF_WORD = "</w>"

# word -> its intended sub-tokens (without the end-of-word suffix on the last one).
SPLIT_WORDS: dict[str, tuple[str, ...]] = {"turquoise": ("turqu", "oise")}


def intended_tokens(word: str) -> list[str]:
    """The tokens a caption word must map to, e.g. "red" -> ["red</w>"]."""
    parts = list(SPLIT_WORDS.get(word, (word,)))
    parts[-1] = parts[-1] + END_OF_WORD
    return parts


def _symbols(word: str) -> list[str]:
    """A word as BPE starts it: one symbol per character, the last with the suffix."""
    chars = list(word)
    chars[-1] = chars[-1] + END_OF_WORD
    return chars


def _apply_bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """Greedy lowest-rank-first BPE of one word (what CLIP's BPE does)."""
    symbols = _symbols(word)
    while len(symbols) > 1:
        pairs = [(ranks.get((a, b), None), i) for i, (a, b) in enumerate(zip(symbols, symbols[1:]))]
        candidates = [(r, i) for r, i in pairs if r is not None]
        if not candidates:
            break
        rank, _ = min(candidates)
        a, b = next(p for p in zip(symbols, symbols[1:]) if ranks.get(p) == rank)
        merged: list[str] = []
        i = 0
        while i < len(symbols):
            if i + 1 < len(symbols) and symbols[i] == a and symbols[i + 1] == b:
                merged.append(a + b)
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def _boundaries(tokens: list[str]) -> set[int]:
    """Character offsets where the tokens of a word start (suffix not counted)."""
    offsets, pos = set(), 0
    for tok in tokens:
        offsets.add(pos)
        pos += len(tok.removesuffix(END_OF_WORD))
    return offsets


def build_merges(words: list[str]) -> list[tuple[str, str]]:
    """BPE merges under which every word tokenizes to `intended_tokens(word)`.

    Merges are added lowest-priority-last: while some word stops short of its intended
    tokens, merge its first adjacent pair that does not cross an intended token boundary.
    """
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for _ in range(10_000):
        progress = False
        for word in words:
            target = intended_tokens(word)
            current = _apply_bpe(word, ranks)
            if current == target:
                continue
            bounds = _boundaries(target)
            pos = 0
            for a, b in zip(current, current[1:]):
                pos += len(a.removesuffix(END_OF_WORD))
                if pos not in bounds and (a, b) not in ranks:
                    ranks[(a, b)] = len(merges)
                    merges.append((a, b))
                    progress = True
                    break
            else:
                raise ValueError(f"cannot reach {target} for {word!r}; BPE gives {current}")
        if not progress:
            break
    bad = {w: _apply_bpe(w, ranks) for w in words if _apply_bpe(w, ranks) != intended_tokens(w)}
    if bad:
        raise ValueError(f"merges do not produce the intended tokens: {bad}")
    return merges


def build_vocab(words: list[str], merges: list[tuple[str, str]]) -> dict[str, int]:
    """Vocabulary: single characters, every merge result, then the two special tokens last."""
    tokens: list[str] = []
    for word in words:
        tokens.extend(_symbols(word))
        tokens.extend(c for c in word)  # plain characters too, for words seen mid-token
    tokens.extend(a + b for a, b in merges)
    tokens = sorted(dict.fromkeys(tokens), key=lambda t: (len(t), t))
    vocab = {tok: i for i, tok in enumerate(tokens)}
    vocab[BOS_TOKEN] = len(vocab)
    vocab[EOS_TOKEN] = len(vocab)  # highest id, like CLIP (pooling may argmax the ids)
    return vocab


def write_tokenizer_files(folder: str | Path, words: list[str] | None = None) -> Path:
    """Write vocab.json, merges.txt and the tokenizer configs into `folder`; return it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    words = caption_words() if words is None else words
    merges = build_merges(words)
    vocab = build_vocab(words, merges)
    (folder / "vocab.json").write_text(json.dumps(vocab, indent=1) + "\n")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n")
    tokenizer = CLIPTokenizer(vocab=vocab, merges=list(merges), model_max_length=MODEL_MAX_LENGTH)
    tokenizer.save_pretrained(str(folder))
    logger.info(
        "wrote tokenizer with %d tokens and %d merges to %s", len(vocab), len(merges), folder
    )
    return folder


def build_tokenizer(folder: str | Path, words: list[str] | None = None) -> CLIPTokenizer:
    """Write the tokenizer files into `folder` and load them back as SD pipelines do."""
    write_tokenizer_files(folder, words)
    return CLIPTokenizer.from_pretrained(str(folder))
