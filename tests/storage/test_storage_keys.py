"""Key layout: determinism, sensitivity to every input, safety checks."""

from __future__ import annotations

import pytest

from storage import keys

CONTENT = keys.sha256_hex(b"image bytes")
FACTS = {
    "model_id": "refmodel/shapes-v1",
    "revision": "abc123",
    "scheduler": {"name": "DDIMScheduler", "beta_schedule": "scaled_linear", "steps_offset": 1},
    "num_steps": 50,
    "guidance_scale": 1.0,
    "size_policy": "resize-512",
    "source_prompt": "a red circle",
    "format_version": 1,
}


def test_sha256_hex() -> None:
    assert (
        keys.sha256_hex(b"") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    )


def test_inversion_key_deterministic_and_order_free() -> None:
    k = keys.inversion_key(CONTENT, FACTS)
    assert len(k) == 64 and k == keys.inversion_key(CONTENT, dict(reversed(list(FACTS.items()))))
    assert keys.inversion_object_key(k) == f"inversions/{k[:2]}/{k}.safetensors"
    assert keys.features_object_key(k, "0a1b") == f"features/{k[:2]}/{k}-0a1b.safetensors"


@pytest.mark.parametrize(
    "change",
    [
        {"model_id": "other/model"},
        {"revision": "def456"},
        {"scheduler": {**FACTS["scheduler"], "steps_offset": 0}},
        {"num_steps": 51},
        {"guidance_scale": 1.5},
        {"size_policy": "resize-768"},
        {"source_prompt": "a red square"},
        {"format_version": 2},
        {"extra": True},
    ],
)
def test_inversion_key_changes_with_any_fact(change: dict) -> None:
    assert keys.inversion_key(CONTENT, {**FACTS, **change}) != keys.inversion_key(CONTENT, FACTS)


def test_inversion_key_changes_with_content() -> None:
    assert keys.inversion_key(keys.sha256_hex(b"other"), FACTS) != keys.inversion_key(
        CONTENT, FACTS
    )


@pytest.mark.parametrize(
    ("content", "facts", "match"),
    [
        ("abc", FACTS, "64 lowercase hex"),
        (CONTENT.upper(), FACTS, "64 lowercase hex"),
        (CONTENT, {"x": float("nan")}, "serialisable"),
        (CONTENT, {"x": object()}, "serialisable"),
        (CONTENT, ["not", "a", "mapping"], "mapping"),
    ],
)
def test_inversion_key_errors(content, facts, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        keys.inversion_key(content, facts)


def test_object_key_errors() -> None:
    with pytest.raises(ValueError):
        keys.inversion_object_key("../etc")
    with pytest.raises(ValueError):
        keys.features_object_key(keys.inversion_key(CONTENT, FACTS), "a/b")


def test_layout() -> None:
    assert keys.asset_key("e1", "png") == "assets/e1.png"
    assert keys.asset_key("e1", ".JPEG") == "assets/e1.jpeg"
    assert keys.sidecar_key("e1") == "assets/e1.json"
    assert keys.run_prefix("r1") == "runs/r1/"
    assert keys.plan_key("r1") == "runs/r1/plan.json"
    assert keys.summary_key("r1") == "runs/r1/summary.json"
    assert keys.shard_results_key("r1", 3) == "runs/r1/results/shard-00003.parquet"
    assert keys.shard_plan_key("r1", 12) == "runs/r1/shards/shard-00012.parquet"
    run_id = keys.new_run_id()
    assert keys.run_prefix(run_id).startswith("runs/2")


@pytest.mark.parametrize(
    "bad", ["a/b", "..", "a..b", "x\ny", "tab\there", "", "x" * 201, "back\\slash"]
)
def test_unsafe_ids_rejected(bad: str) -> None:
    with pytest.raises(ValueError, match="edit_id"):
        keys.check_id(bad)
    with pytest.raises(ValueError):
        keys.asset_key(bad, "png")


@pytest.mark.parametrize("good", ["sku-123_red", "a.b", "Ünïcode ok", "x" * 200])
def test_safe_ids_accepted(good: str) -> None:
    assert keys.check_id(good) == good


@pytest.mark.parametrize("bad", [-1, 1.0, True])
def test_bad_shard_index(bad) -> None:
    with pytest.raises(ValueError, match="shard_index"):
        keys.shard_results_key("r1", bad)
