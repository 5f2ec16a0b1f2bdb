"""Token alignment for Prompt-to-Prompt: spans, word swap (equal and unequal sub-tokens), refine, re-weighting."""

from __future__ import annotations

import pytest
import torch

from editing import alignment


def _tok_positions(tok, prompt):
    spans, end = alignment.word_spans(tok, prompt)
    return {s.word: list(range(s.start, s.end)) for s in spans}, end


def test_word_spans_count_subtokens(tiny):
    tok = tiny.tokenizer
    pos, end = _tok_positions(tok, "a turquoise cat")
    assert pos == {"a": [1], "turquoise": [2, 3], "cat": [4]}
    assert end == 5  # the end token's position
    assert tok.encode("a turquoise cat")[end] == tok.eos_token_id


def test_swap_equal_token_counts_is_a_permutation_of_the_diagonal(tiny):
    tok = tiny.tokenizer
    m, a = alignment.swap_mapper(tok, "a photo of a cat", "a photo of a dog")
    assert torch.equal(
        m, torch.eye(tok.model_max_length)
    )  # same positions, the swapped word included
    assert torch.all(a == 1)


@pytest.mark.parametrize(
    "source,target,swapped_src,swapped_tgt,after",
    [
        # 1 sub-token -> 2 sub-tokens: every later token shifts by one in the target
        (
            "a red cat on gray background",
            "a turquoise cat on gray background",
            [2],
            [2, 3],
            [(3, 4), (4, 5), (5, 6), (6, 7)],
        ),
        # 2 -> 1: later tokens shift back by one
        (
            "a turquoise cat on gray background",
            "a red cat on gray background",
            [2, 3],
            [2],
            [(4, 3), (5, 4), (6, 5), (7, 6)],
        ),
    ],
)
def test_swap_unequal_token_counts_aligns_every_later_token(
    tiny, source, target, swapped_src, swapped_tgt, after
):
    tok = tiny.tokenizer
    m, _ = alignment.swap_mapper(tok, source, target)
    block = m[swapped_src][:, swapped_tgt]
    assert torch.allclose(block, torch.full_like(block, 1 / len(swapped_tgt)))
    for s, t in after:  # the words after the swap, and the end token
        assert m[s, t] == 1.0, (s, t)
        assert m[s].sum() == 1.0 and m[:, t].sum() == 1.0
    n_src = len(tok.encode(source))
    n_tgt = len(tok.encode(target))
    assert m[n_src - 1, n_tgt - 1] == 1.0  # end token to end token
    # the reference's bug wrote mapper[j, j]: the first word after the swap would map to itself
    first_after_src, first_after_tgt = after[0]
    assert first_after_src == first_after_tgt or m[first_after_src, first_after_src] == 0.0
    # every other target column takes exactly one source map; the swapped word's total mass is kept
    cols = m.sum(0)
    others = [j for j in range(tok.model_max_length) if j not in swapped_tgt]
    assert torch.allclose(cols[others], torch.ones(len(others)))
    assert torch.isclose(cols[swapped_tgt].sum(), torch.tensor(float(len(swapped_src))))


def test_swap_refuses_different_word_counts(tiny):
    with pytest.raises(ValueError, match="same number of words"):
        alignment.swap_mapper(tiny.tokenizer, "a cat", "a red cat")


@pytest.mark.parametrize(
    "source,target,new_words",
    [
        ("a photo of a car", "a photo of a red car", ["red"]),
        ("a cat", "a big turquoise cat with hat", ["big", "turquoise", "with", "hat"]),
    ],
)
def test_refine_maps_kept_tokens_and_frees_inserted_ones(tiny, source, target, new_words):
    tok = tiny.tokenizer
    m, a = alignment.refine_mapper(tok, source, target)
    x, y = tok.encode(source), tok.encode(target)
    tpos, _ = _tok_positions(tok, target)
    new = {p for w in new_words for p in tpos[w]}
    for j in range(len(y)):
        if j in new:
            assert a[j] == 0 and m[:, j].sum() == 0
        else:
            assert a[j] == 1
            (i,) = torch.nonzero(m[:, j]).flatten().tolist()
            assert x[i] == y[j]  # aligned to an identical source token
    # order preserved: aligned source positions increase
    aligned = [int(torch.nonzero(m[:, j]).flatten()[0]) for j in range(len(y)) if j not in new]
    assert aligned == sorted(aligned)


def test_global_alignment_prefers_gaps_to_mismatches():
    assert alignment.global_alignment([1, 2, 3], [1, 9, 2, 3]) == [0, None, 1, 2]
    assert alignment.global_alignment([1, 5, 3], [1, 6, 3]) == [0, None, 2]


def test_equalizer_scales_exactly_the_word_columns(tiny):
    tok = tiny.tokenizer
    eq = alignment.equalizer_vector(
        tok, "a turquoise cat on gray background", {"turquoise": 3.0, "gray": -1.5}
    )
    expected = torch.ones(tok.model_max_length)
    expected[[2, 3]] = 3.0
    expected[6] = -1.5
    assert torch.equal(eq, expected)
    with pytest.raises(ValueError, match="not in the prompt"):
        alignment.equalizer_vector(tok, "a cat", {"dog": 2.0})


def test_cross_replace_schedule_per_word(tiny):
    tok = tiny.tokenizer
    s = alignment.cross_replace_schedule(tok, "a red cat", {"default_": 0.8, "red": 0.3}, 10)
    assert s.shape == (10, tok.model_max_length)
    assert s[:, 1].tolist() == [1] * 8 + [0] * 2  # "a": default 0.8
    assert s[:, 2].tolist() == [1] * 3 + [0] * 7  # "red": 0.3


@pytest.mark.parametrize(
    "source,target,kind",
    [
        ("a cat", "a dog", "replace"),
        ("a cat", "a red cat", "refine"),
        ("a cat", "a cat", "reweight"),
    ],
)
def test_auto_kind_rule(tiny, source, target, kind):
    assert alignment.resolve_kind(tiny.tokenizer, "auto", source, target) == kind


# ---- words as the tokenizer splits them (punctuation) and equal sub-token counts (issue 10) ----


@pytest.fixture(scope="module")
def ref_tok():
    """The bundled reference model's own tokenizer (v1 encodes "," and "." as the unknown token, a
    later one has "," in its vocabulary: either way a punctuation mark is a token of its own)."""
    from transformers import CLIPTokenizer

    from refmodel import REFERENCE_MODEL_DIR

    return CLIPTokenizer.from_pretrained(str(REFERENCE_MODEL_DIR / "tokenizer"))


@pytest.fixture(scope="module")
def clip_tok(tmp_path_factory):
    """A CLIP BPE tokenizer of the domain's words with "," and "." in its vocabulary, and "watercolor"
    split into two sub-tokens like "turquoise" (so the two are 2 and 2 sub-tokens)."""
    from refmodel import tokenizer as reftok
    from refmodel.domain import caption_words

    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(reftok.SPLIT_WORDS, "watercolor", ("water", "color"))
        words = [*caption_words(), ".", "cat", "dog", "watercolor"]
        return reftok.build_tokenizer(tmp_path_factory.mktemp("clip-tok"), words)


@pytest.fixture(params=["ref", "clip"])
def punct_tok(request, ref_tok, clip_tok):
    return ref_tok if request.param == "ref" else clip_tok


def test_word_spans_give_punctuation_its_own_word(punct_tok):
    spans, end = alignment.word_spans(punct_tok, "a red circle, on a gray background.")
    assert [s.word for s in spans] == [
        "a",
        "red",
        "circle",
        ",",
        "on",
        "a",
        "gray",
        "background",
        ".",
    ]
    assert [(s.start, s.end) for s in spans] == [(i, i + 1) for i in range(1, 10)]
    assert end == 10


@pytest.mark.parametrize(
    "source,target",
    [
        ("a red circle.", "a red square."),
        ("a red circle, on a gray background", "a red square, on a gray background"),
    ],
)
def test_swap_next_to_punctuation_maps_word_to_word_and_mark_to_mark(punct_tok, source, target):
    m, a = alignment.swap_mapper(punct_tok, source, target)
    # every word and mark is one token here: the swap is the identity permutation (circle -> square at
    # the same position, "." -> "."), never a 2x2 block of 1/2 spreading the word over the mark
    assert torch.equal(m, torch.eye(punct_tok.model_max_length))
    assert torch.all(a == 1)


def test_swap_to_more_subtokens_next_to_a_comma_spreads_only_the_word(clip_tok):
    tok = clip_tok
    m, _ = alignment.swap_mapper(
        tok, "a cat, on a gray background", "a turquoise, on a gray background"
    )
    # source: a=1 cat=2 ,=3 on=4 ... ; target: a=1 turqu=2 oise=3 ,=4 on=5 ...
    assert torch.allclose(m[2, [2, 3]], torch.tensor([0.5, 0.5]))
    assert m[3, 4] == 1.0 and m[3].sum() == 1.0  # the comma maps onto the comma only
    assert m[2, 4] == 0.0 and m[3, [2, 3]].sum() == 0.0
    for s in range(4, 9):  # on a gray background <end>: shifted by one
        assert m[s, s + 1] == 1.0


def test_swap_equal_subtoken_counts_maps_position_to_position(clip_tok):
    tok = clip_tok
    assert len(tok.encode("turquoise", add_special_tokens=False)) == 2
    assert len(tok.encode("watercolor", add_special_tokens=False)) == 2
    m, _ = alignment.swap_mapper(tok, "a turquoise circle", "a watercolor circle")
    assert torch.equal(m, torch.eye(tok.model_max_length))  # turqu -> water, oise -> color


def test_word_positions_exclude_attached_punctuation(punct_tok):
    assert alignment.positions_of(punct_tok, "a red circle.", ["circle"]) == [3]
    assert alignment.positions_of(punct_tok, "a red circle, on a gray background", ["circle,"]) == [
        3
    ]
    eq = alignment.equalizer_vector(punct_tok, "a red circle.", {"circle": 2.0})
    assert eq[3] == 2.0 and eq[4] == 1.0  # the period keeps its weight
    assert alignment.positions_of(punct_tok, "a red circle.", ["."]) == [
        4
    ]  # a mark can be named itself
    with pytest.raises(ValueError, match="not in the prompt"):
        alignment.positions_of(punct_tok, "a red circle.", ["square"])


@pytest.mark.parametrize(
    "source,target,kind",
    [("a red circle.", "a red square.", "replace"), ("a red circle.", "a red circle", "refine"),
     ("a red circle.", "a red circle.", "reweight"), ("a red circle,", "a red circle.", "replace")],
)  # fmt: skip
def test_auto_kind_counts_words_as_the_tokenizer_splits_them(punct_tok, source, target, kind):
    assert alignment.resolve_kind(punct_tok, "auto", source, target) == kind
    alignment.p2p_mapper(punct_tok, "auto", source, target)  # and the chosen mapper accepts them


class _NoWordIds:
    """The same tokenizer seen as a slow one (no word ids or offsets): the CLIP-pattern fallback."""

    is_fast = False

    def __init__(self, tok):
        self._tok, self.model_max_length = tok, tok.model_max_length

    def encode(self, text, add_special_tokens=True):
        return self._tok.encode(text, add_special_tokens=add_special_tokens)


def test_word_split_without_word_ids_matches_the_tokenizers(punct_tok):
    slow = _NoWordIds(punct_tok)
    for prompt in [
        "a red circle, on a gray background.",
        "a turquoise circle on a black background, dotted",
    ]:
        assert alignment.tokenizer_words(slow, prompt) == alignment.tokenizer_words(
            punct_tok, prompt
        )
    m, _ = alignment.swap_mapper(slow, "a red circle.", "a red square.")
    assert torch.equal(m, torch.eye(punct_tok.model_max_length))
