"""Token alignment for Prompt-to-Prompt: word spans, word-swap and refine mappers, re-weighting vectors.

A mapper is a pair (M, a): M is (L, L) with M[s, t] the weight of source token s's cross-attention map in
target token t's edited map, and a is (L,) with 1 where target token t takes the mapped source map and 0
where it keeps its own (refine's new tokens). L is the tokenizer's length; position 0 is the start token.

Words are the tokenizer's own pre-tokens (CLIP: runs of letters, single digits, runs of punctuation), not
whitespace-separated strings: in "a cat, on" the comma is a word of its own, so swapping "cat" never
spreads its map over the comma.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

# CLIP's pre-tokenization pattern in stdlib `re` terms (letters = [^\W\d_]), for tokenizers that do not
# report word ids (slow tokenizers); the encodings are checked against the whole prompt's either way.
_CLIP_WORDS = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\s\w]|_)+", re.IGNORECASE)


@dataclass(frozen=True)
class WordSpan:
    word: str
    start: int  # first token position in the encoded sequence (start token = 0)
    end: int  # one past the last token


def _norm(word: str) -> str:
    return word.lower().strip(".,;:!?\"'()[]")


def tokenizer_words(tokenizer, prompt: str) -> list[tuple[str, list[int]]]:
    """The prompt's words as the tokenizer splits them, each with its token ids (no start/end tokens)."""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
        # (word id, first char, end char, token ids) per word
        groups: list[tuple[int | None, int, int, list[int]]] = []
        for tid, wid, (a, b) in zip(enc["input_ids"], enc.word_ids(), enc["offset_mapping"]):
            if groups and wid is not None and groups[-1][0] == wid:
                groups[-1] = (wid, groups[-1][1], b, [*groups[-1][3], tid])
            else:
                groups.append((wid, a, b, [tid]))
        return [(prompt[a:b], ids) for _, a, b, ids in groups]
    words = [
        (w, tokenizer.encode(w, add_special_tokens=False)) for w in _CLIP_WORDS.findall(prompt)
    ]
    if [t for _, ids in words for t in ids] != tokenizer.encode(prompt, add_special_tokens=False):
        words = [(w, tokenizer.encode(w, add_special_tokens=False)) for w in prompt.split()]
    return words


def words_of(tokenizer, prompt: str) -> list[str]:
    """The prompt's words as the tokenizer splits them, lower-cased (punctuation marks are words)."""
    return [w.lower() for w, _ in tokenizer_words(tokenizer, prompt)]


def word_spans(tokenizer, prompt: str) -> tuple[list[WordSpan], int]:
    """Token spans of each word (as the tokenizer splits them), and the position of the end token."""
    spans: list[WordSpan] = []
    pos = 1
    all_ids: list[int] = []
    for word, ids in tokenizer_words(tokenizer, prompt):
        spans.append(WordSpan(word, pos, pos + len(ids)))
        all_ids.extend(ids)
        pos += len(ids)
    full = tokenizer.encode(prompt, add_special_tokens=False)
    if full != all_ids:
        raise ValueError(f"cannot split prompt {prompt!r} into word tokens consistently")
    if pos + 1 > tokenizer.model_max_length:
        raise ValueError(
            f"prompt is too long for the tokenizer ({pos + 1} > {tokenizer.model_max_length}): {prompt!r}"
        )
    return spans, pos


def token_ids(tokenizer, prompt: str) -> list[int]:
    """Ids with start and end tokens, without padding."""
    return tokenizer.encode(prompt, add_special_tokens=True)


def _tail(mapper: torch.Tensor, src_end: int, tgt_end: int) -> None:
    """Map the end token and padding of the source onto those of the target, position by position."""
    length = mapper.shape[0]
    for n in range(length - tgt_end):
        mapper[min(src_end + n, length - 1), tgt_end + n] = 1.0


def swap_mapper(tokenizer, source: str, target: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Word swap: the prompts have the same number of words; differing words swap their maps.

    Words of equal token counts map position to position (as the reference does: "turquoise" -> "watercolor",
    2 and 2 sub-tokens, maps turqu -> water and oise -> color). A word of n source tokens replaced by one
    of m != n target tokens maps the whole n x m block with weight 1/m (the word's attention is spread
    over the target's sub-tokens). Every later token is aligned by its own word's position, so sub-token
    count changes never shift the rest (the reference's bug).
    """
    src_spans, src_end = word_spans(tokenizer, source)
    tgt_spans, tgt_end = word_spans(tokenizer, target)
    if len(src_spans) != len(tgt_spans):
        raise ValueError(
            f"word swap needs the same number of words: {len(src_spans)} in {source!r}, "
            f"{len(tgt_spans)} in {target!r} (use kind='refine' or 'auto')"
        )
    length = tokenizer.model_max_length
    mapper = torch.zeros(length, length)
    mapper[0, 0] = 1.0
    for s, t in zip(src_spans, tgt_spans):
        n_t = t.end - t.start
        if (s.end - s.start) == n_t:
            for i in range(n_t):
                mapper[s.start + i, t.start + i] = 1.0
        else:
            mapper[s.start : s.end, t.start : t.end] = 1.0 / n_t
    _tail(mapper, src_end, tgt_end)
    return mapper, torch.ones(length)


def global_alignment(x: list[int], y: list[int]) -> list[int | None]:
    """Needleman-Wunsch (match 1, mismatch -1, gap 0): for each y position, its aligned x position or None.

    Only equal tokens are aligned (with these scores two gaps always beat a mismatch).
    """
    n, m = len(x), len(y)
    score = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            diag = score[i - 1][j - 1] + (1 if x[i - 1] == y[j - 1] else -1)
            score[i][j] = max(diag, score[i - 1][j], score[i][j - 1])
    out: list[int | None] = [None] * m
    i, j = n, m
    while i > 0 and j > 0:
        if x[i - 1] == y[j - 1] and score[i][j] == score[i - 1][j - 1] + 1:
            out[j - 1] = i - 1
            i, j = i - 1, j - 1
        elif score[i][j] == score[i - 1][j]:
            i -= 1
        else:
            j -= 1
    return out


def refine_mapper(tokenizer, source: str, target: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Adding a phrase: align the token sequences globally; new target tokens keep their own maps."""
    x, y = token_ids(tokenizer, source), token_ids(tokenizer, target)
    length = tokenizer.model_max_length
    if max(len(x), len(y)) > length:
        raise ValueError(f"prompt too long for the tokenizer ({max(len(x), len(y))} > {length})")
    mapper = torch.zeros(length, length)
    alpha = torch.ones(length)
    for j, i in enumerate(global_alignment(x, y)):
        if i is None:
            alpha[j] = 0.0
        else:
            mapper[i, j] = 1.0
    _tail(mapper, len(x), len(y))
    return mapper, alpha


def identity_mapper(length: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.eye(length), torch.ones(length)


def positions_of(tokenizer, prompt: str, words: list[str] | tuple[str, ...]) -> list[int]:
    """Token positions of every occurrence of each word in `prompt`; a missing word is an error."""
    spans, _ = word_spans(tokenizer, prompt)
    out: list[int] = []
    for w in words:
        hits = [s for s in spans if s.word.lower() == w.lower()]
        # "circle," names the word "circle"; a punctuation mark names only itself
        if not hits and _norm(w):
            hits = [s for s in spans if _norm(s.word) == _norm(w)]
        if not hits:
            raise ValueError(f"word {w!r} is not in the prompt {prompt!r}")
        for s in hits:
            out.extend(range(s.start, s.end))
    return out


def equalizer_vector(tokenizer, prompt: str, weights: dict[str, float]) -> torch.Tensor:
    """(L,) multipliers: the columns of the weighted words' tokens get their weight, the rest 1."""
    eq = torch.ones(tokenizer.model_max_length)
    for word, w in weights.items():
        eq[positions_of(tokenizer, prompt, [word])] = float(w)
    return eq


def cross_replace_schedule(tokenizer, prompt: str, fractions, num_steps: int) -> torch.Tensor:
    """(T, L) 0/1: whether target token t takes the edited source map at step i (0 = noisiest)."""
    if isinstance(fractions, dict):
        default = float(fractions.get("default_", 0.8))
        per_word = {w: f for w, f in fractions.items() if w != "default_"}
    else:
        default, per_word = float(fractions), {}
    length = tokenizer.model_max_length
    sched = torch.zeros(num_steps, length)
    sched[: int(default * num_steps)] = 1.0
    for word, frac in per_word.items():
        cols = positions_of(tokenizer, prompt, [word])
        sched[:, cols] = 0.0
        sched[: int(float(frac) * num_steps), cols] = 1.0
    return sched


def resolve_kind(tokenizer, kind: str, source: str, target: str) -> str:
    """The rule for kind='auto': reweight when the prompts have the same words, replace when they have the
    same number of words (as the tokenizer splits them: a punctuation mark is a word), refine otherwise."""
    if kind != "auto":
        return kind
    src, tgt = words_of(tokenizer, source), words_of(tokenizer, target)
    if src == tgt:
        return "reweight"
    return "replace" if len(src) == len(tgt) else "refine"


def p2p_mapper(tokenizer, kind: str, source: str, target: str) -> tuple[torch.Tensor, torch.Tensor]:
    kind = resolve_kind(tokenizer, kind, source, target)
    if kind == "replace":
        return swap_mapper(tokenizer, source, target)
    if kind == "refine":
        return refine_mapper(tokenizer, source, target)
    if kind == "reweight":
        if words_of(tokenizer, source) != words_of(tokenizer, target):
            # re-weighting with a different prompt: align what can be aligned
            return refine_mapper(tokenizer, source, target)
        return identity_mapper(tokenizer.model_max_length)
    raise ValueError(f"unknown Prompt-to-Prompt kind {kind!r}")
