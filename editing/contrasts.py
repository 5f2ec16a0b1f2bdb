"""Contrast prompts for the edit-QA judge derived from an edit's prompt pair, with no word lists: for a word
swap, the target prompt with the target word replaced by its nearest whole-word tokens in the text
encoder's input token-embedding table.

    swap_span("a red circle", "a green circle")          # the changed span: (2, 7, "green", "red")
    derive_contrasts(model, "a red circle", "a green circle", 2)   # ("a yellow circle", ...): the model's

A pair that is not one span swapped for another (a restyle that appends words, an addition, a deletion)
gets none. Which words come back is the model's own notion of nearness: on a well-trained CLIP the
neighbours of a colour are mostly colours; on the bundled toy model they are a mix of kinds (README: Edit QA).
torch only (no Prefect, no storage).
"""

from __future__ import annotations

import re
import weakref
from typing import Any

import torch

from editing.model import EditModel

__all__ = ["derive_contrasts", "nearest_words", "swap_span", "whole_word_tokens"]

# words and single punctuation marks: "background, dotted" -> "background", ",", "dotted"
_WORD = re.compile(r"\w+|[^\w\s]")
# the longest span (words or punctuation marks) of either prompt that counts as one swap ("dark green")
SPAN_MAX_WORDS = 3
# CLIP's BPE marks a token that ends a word with this suffix
_END_OF_WORD = "</w>"
# whole-word token ids per tokenizer, found once (a CLIP vocabulary has ~49k tokens); weakly keyed, so that
# a tokenizer freed and another made at its address never reads its entry
_WHOLE_WORDS: weakref.WeakKeyDictionary[Any, tuple[list[int], list[str]]] = (
    weakref.WeakKeyDictionary()
)


def swap_span(source: str, target: str) -> tuple[int, int, str, str] | None:
    """Where `target` differs from `source` when the two are the same words except one span that is
    non-empty in both, of at most SPAN_MAX_WORDS words and with no word in common (a word swap): (start, end) character offsets of the span in `target`, the target
    span's text and the source span's text. None for equal prompts, additions and deletions (a restyle
    that appends ", watercolor") and pairs that differ in more than one place."""
    s = [(m.group(0).lower(), m.start(), m.end()) for m in _WORD.finditer(source)]
    t = [(m.group(0).lower(), m.start(), m.end()) for m in _WORD.finditer(target)]
    lead = 0
    while lead < min(len(s), len(t)) and s[lead][0] == t[lead][0]:
        lead += 1
    trail = 0
    while trail < min(len(s), len(t)) - lead and s[-1 - trail][0] == t[-1 - trail][0]:
        trail += 1
    s_span, t_span = s[lead : len(s) - trail], t[lead : len(t) - trail]
    if not s_span or not t_span or max(len(s_span), len(t_span)) > SPAN_MAX_WORDS:
        return None
    if {w for w, _, _ in s_span} & {w for w, _, _ in t_span}:
        return None  # a word kept inside the span: changes in more than one place
    start, end = t_span[0][1], t_span[-1][2]
    return start, end, target[start:end], source[s_span[0][1] : s_span[-1][2]]


def whole_word_tokens(tokenizer: Any) -> tuple[list[int], list[str]]:
    """The ids and words of the tokenizer's whole-word tokens: tokens that are a complete word of two or
    more letters (CLIP BPE's ``word</w>``). Cached per tokenizer."""
    key = tokenizer
    if key not in _WHOLE_WORDS:
        ids, words = [], []
        for token, i in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
            stem = token[: -len(_END_OF_WORD)]
            if token.endswith(_END_OF_WORD) and len(stem) >= 2 and stem.isalpha():
                ids.append(i)
                words.append(stem)
        _WHOLE_WORDS[key] = (ids, words)
    return _WHOLE_WORDS[key]


@torch.no_grad()
def nearest_words(model: EditModel, span: str, exclude: str, n: int) -> list[str]:
    """The `n` whole-word tokens nearest (cosine) to `span` in the text encoder's input token-embedding
    table, nearest first: a span of several tokens ("turquoise" = "turqu" + "oise") is the mean of its
    tokens' embeddings. Tokens of `span` and `exclude` and their words are left out."""
    ids, words = whole_word_tokens(model.tokenizer)
    if n <= 0 or not ids:
        return []
    table = model.text_encoder.get_input_embeddings().weight  # (V, D)
    own = model.tokenizer(span, add_special_tokens=False).input_ids
    other = model.tokenizer(exclude, add_special_tokens=False).input_ids
    if not own:
        return []
    query = table[own].float().mean(0)  # (D,)
    cand = table[torch.tensor(ids, device=table.device)].float()  # (W, D)
    sims = torch.nn.functional.cosine_similarity(cand, query[None], dim=-1).cpu()  # (W,)
    skip_ids = set(own) | set(other)
    skip_words = {w.lower() for w in _WORD.findall(span) + _WORD.findall(exclude)}
    out = []
    for j in sims.argsort(descending=True).tolist():
        if ids[j] in skip_ids or words[j] in skip_words:
            continue
        out.append(words[j])
        if len(out) == n:
            break
    return out


def derive_contrasts(model: EditModel, source: str, target: str, n: int) -> tuple[str, ...]:
    """Up to `n` contrast prompts for an edit from `source` to `target`: `target` with its swapped span
    replaced by each of :func:`nearest_words` (the source word excluded: the source prompt is always
    judged). () when the pair is not a single-span swap (:func:`swap_span`) or `n` is 0."""
    span = swap_span(source, target) if n > 0 else None
    if span is None:
        return ()
    start, end, new, old = span
    return tuple(
        target[:start] + w + target[end:] for w in nearest_words(model, new, exclude=old, n=n)
    )
