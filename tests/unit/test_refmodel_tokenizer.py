"""Tests for the caption tokenizer: every word's tokens, the two-sub-token word, loading paths."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer, CLIPTokenizer

from refmodel.domain import caption_words
from refmodel.tokenizer import (
    BOS_TOKEN,
    EOS_TOKEN,
    MODEL_MAX_LENGTH,
    SPLIT_WORDS,
    build_merges,
    intended_tokens,
    write_tokenizer_files,
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tokenizer_files(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module", params=["clip", "auto"])
def tokenizer(request: pytest.FixtureRequest, folder: Path):
    if request.param == "clip":
        return CLIPTokenizer.from_pretrained(str(folder))
    return AutoTokenizer.from_pretrained(str(folder))


@pytest.mark.parametrize("word", caption_words())
def test_every_word_tokenizes_as_intended(tokenizer, word: str) -> None:
    ids = tokenizer(word, add_special_tokens=False).input_ids
    assert tokenizer.convert_ids_to_tokens(ids) == intended_tokens(word)
    assert tokenizer.unk_token_id not in ids or word == EOS_TOKEN


def test_split_word_has_two_tokens(tokenizer) -> None:
    assert "turquoise" in SPLIT_WORDS
    ids = tokenizer("turquoise", add_special_tokens=False).input_ids
    assert tokenizer.convert_ids_to_tokens(ids) == ["turqu", "oise</w>"]
    others = [w for w in caption_words() if w not in SPLIT_WORDS]
    assert all(len(tokenizer(w, add_special_tokens=False).input_ids) == 1 for w in others)


def test_caption_encoding_like_the_pipeline(tokenizer) -> None:
    enc = tokenizer(
        "a turquoise circle on a gray background",
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    ids = enc.input_ids[0].tolist()
    assert tokenizer.model_max_length == MODEL_MAX_LENGTH == len(ids)
    assert ids[0] == tokenizer.bos_token_id
    words = ["a", "turquoise", "circle", "on", "a", "gray", "background"]
    body = [t for w in words for t in intended_tokens(w)]
    assert tokenizer.convert_ids_to_tokens(ids[1 : 1 + len(body)]) == body
    assert set(ids[1 + len(body) :]) == {tokenizer.eos_token_id}
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == " ".join(words)


def test_special_tokens(tokenizer) -> None:
    assert tokenizer.bos_token == BOS_TOKEN and tokenizer.eos_token == EOS_TOKEN
    # EOS has the highest id, as in CLIP (pooling may take the argmax of the ids)
    assert tokenizer.eos_token_id == len(tokenizer) - 1
    assert tokenizer("").input_ids == [tokenizer.bos_token_id, tokenizer.eos_token_id]


def test_merges_respect_split_boundaries() -> None:
    merges = build_merges(caption_words())
    assert ("turqu", "oise</w>") not in merges
    assert len(set(merges)) == len(merges)


def test_pipeline_loads_the_tokenizer(folder: Path, tmp_path: Path) -> None:
    """Save a tiny SD pipeline with this tokenizer and load it back as diffusers does."""
    from diffusers import StableDiffusionPipeline

    from refmodel.models import ModelConfig, build_text_encoder, build_unet, build_vae
    from refmodel.train import make_pipeline

    cfg = ModelConfig(
        vae_channels=(8, 8),
        vae_groups=4,
        unet_channels=(8, 8, 8, 8),
        unet_heads=(2, 2, 2, 2),
        unet_groups=4,
        text_hidden=8,
        text_intermediate=16,
        text_layers=1,
        text_heads=2,
    )
    tok = CLIPTokenizer.from_pretrained(str(folder))
    pipe = make_pipeline(build_vae(cfg), build_text_encoder(cfg, tok), tok, build_unet(cfg))
    pipe.save_pretrained(str(tmp_path / "pipe"), safe_serialization=True)
    loaded = StableDiffusionPipeline.from_pretrained(str(tmp_path / "pipe")).tokenizer
    for word in caption_words():
        ids = loaded(word, add_special_tokens=False).input_ids
        assert loaded.convert_ids_to_tokens(ids) == intended_tokens(word)
    assert loaded.model_max_length == MODEL_MAX_LENGTH


def test_longest_caption_fits(tokenizer) -> None:
    from refmodel.domain import Scene, caption

    longest = caption(Scene("triangle", "turquoise", "white", 16.0, 16.0, 12.0))
    ids = tokenizer(longest).input_ids
    assert len(ids) <= MODEL_MAX_LENGTH
    assert ids[-1] == tokenizer.eos_token_id
