"""Fixed batch shapes: chunks padded to a power of two rows; padding rows take and give nothing, are
discarded, and are counted as waste."""

from __future__ import annotations

import pytest
import torch

from editing.batching import Piece, layout_rows, padded_rows
from editing.configs import P2PConfig, PnPConfig
from editing.inversion import invert_many
from editing.methods import ChunkDone, PnPFeatures, SourceGroup, Target, edit
from tests.editing.conftest import STEPS, make_image


@pytest.mark.parametrize(
    ("rows", "want"), [(1, 1), (2, 2), (3, 4), (4, 4), (5, 8), (17, 32), (24, 32)]
)
def test_padded_rows_are_the_next_power_of_two(rows, want):
    assert padded_rows(rows) == want


def test_padded_rows_refuses_an_empty_chunk():
    with pytest.raises(ValueError, match="at least one row, got 0"):
        padded_rows(0)


def test_padding_rows_take_and_give_nothing(cat_inversion):
    group = SourceGroup(cat_inversion, [Target("a", PnPConfig()), Target("b", PnPConfig())])
    plain = layout_rows([Piece(0, group, (0, 1))], True, feature_steps=[4, 4], attn_steps=[5, 5])
    padded = layout_rows(
        [Piece(0, group, (0, 1))], True, feature_steps=[4, 4], attn_steps=[5, 5], pad=True
    )
    assert (plain.size, plain.padding, padded.size, padded.padding) == (5, 0, 8, 3)
    assert padded.real_rows == plain.size
    for field in ("src", "group", "target", "cond_target", "feature_steps", "attn_steps"):
        assert getattr(padded, field)[:5] == getattr(plain, field)
    assert padded.src[5:] == (-1,) * 3 and not any(padded.target[5:] + padded.cond_target[5:])
    assert (padded.u_rows, padded.c_rows, padded.src_rows) == (
        plain.u_rows,
        plain.c_rows,
        plain.src_rows,
    )


def _every_kind() -> list[Target]:
    return [
        Target("a photo of a dog", PnPConfig()),
        Target("a photo of a red cat", PnPConfig(inject_uncond=True)),
        Target("a photo of a dog", P2PConfig(kind="replace")),
        Target("a photo of a big cat", P2PConfig(kind="refine")),
        Target(
            "a photo of a dog",
            P2PConfig(blend_source_words=("cat",), blend_target_words=("dog",), blend_fraction=1.0),
        ),
    ]


@pytest.mark.parametrize("dtype", ["fp32", "fp64"])
def test_padded_chunks_give_the_same_edits(request, dtype):
    """On CPU with one thread, fp32 real rows are bit-identical with padding on and off; fp64's
    batch-size-dependent kernels may differ in the last bits (seen: ~1e-14 relative), so fp64 is held to
    1e-12. (With several threads the kernels split a batch by its size, so fp32 differs in the last bits
    there too: seen ~1e-5 relative with 2 threads, with and without padding code changes.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    model = request.getfixturevalue("tiny32" if dtype == "fp32" else "tiny")
    invs = invert_many(
        model,
        [make_image(0), make_image(3)],
        ["a photo of a cat", "a photo of a cat"],
        num_steps=STEPS,
    )
    groups = [SourceGroup(inv, _every_kind()) for inv in invs]
    plain_done: list[ChunkDone] = []
    padded_done: list[ChunkDone] = []
    plain = edit(model, groups, max_batch=3, record_features=True, on_chunk=plain_done.append)
    padded = edit(
        model, groups, max_batch=3, record_features=True, pad=True, on_chunk=padded_done.append
    )
    feats = [next(r.features for r in res if r.features is not None) for res in padded]
    warm = [SourceGroup(g.inversion, g.targets[:2], features=f) for g, f in zip(groups, feats)]
    replay_plain = edit(model, warm, max_batch=3)
    replay_padded = edit(model, warm, max_batch=3, pad=True)

    def same(a: torch.Tensor, b: torch.Tensor) -> bool:
        if dtype == "fp32":
            return torch.equal(a, b)
        return bool((a - b).abs().max() <= 1e-12 * b.abs().max())

    for a_res, b_res in ((plain, padded), (replay_plain, replay_padded)):
        for a_list, b_list in zip(a_res, b_res):
            for a, b in zip(a_list, b_list):
                assert not isinstance(a, Exception) and not isinstance(b, Exception)
                assert same(a.latent, b.latent), a.prompt
                assert "padding" not in a.unet_evals
    # the recorded features are those of the unpadded chunk
    for a_list, b_list in zip(plain, padded):
        fa = next(r.features for r in a_list if r.features is not None)
        fb = next(r.features for r in b_list if r.features is not None)
        assert fa.tensors.keys() == fb.tensors.keys()
        assert all(same(fa.tensors[k].double(), fb.tensors[k].double()) for k in fa.tensors)
    assert isinstance(feats[0], PnPFeatures)
    # waste: the padding rows' evaluations, counted per chunk and in each edit's unet_evals
    assert all(d.padding_evals == 0 for d in plain_done)
    assert sum(d.padding_evals for d in padded_done) > 0
    for d_plain, d_padded in zip(plain_done, padded_done):
        assert d_padded.unet_evals == pytest.approx(d_plain.unet_evals + d_padded.padding_evals)
    # each padded chunk's rows are a power of two: (real + padding) evaluations / steps
    for d in padded_done:
        rows = d.unet_evals / STEPS
        assert rows == int(rows) and padded_rows(int(rows)) == int(rows)
