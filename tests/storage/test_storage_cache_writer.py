"""BlobCache, the idempotent asset writer, image encoding with text, Parquet and JSON files."""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import math

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from storage import (
    BlobCache,
    CacheStats,
    ObjectStore,
    encode_image,
    inversion_key,
    inversion_object_key,
    is_finished,
    png_bytes,
    read_json,
    read_parquet,
    sha256_hex,
    to_jsonable,
    write_asset,
    write_json,
    write_parquet,
)


def _image(color: tuple[int, int, int] = (200, 30, 30)) -> Image.Image:
    return Image.new("RGB", (16, 12), color)


def _blob(value: float) -> bytes:
    """A small safetensors blob (cache entries are safetensors; they get a checksum on write)."""
    return st_save({"x": np.full((2, 3), value, np.float32)}, metadata={"facts": "{}"})


def _value(blob: bytes) -> float:
    return float(st_load(blob)["x"][0, 0])


def test_blob_cache_hit_miss_replace(store: ObjectStore, caplog: pytest.LogCaptureFixture) -> None:
    cache = BlobCache(store)
    key = inversion_object_key(inversion_key(sha256_hex(b"img"), {"model_id": "m"}))
    assert cache.get(key) is None
    assert cache.put(key, _blob(1.0)) is True
    assert cache.put(key, _blob(2.0)) is False  # first writer wins
    assert _value(cache.get(key)) == 1.0
    with caplog.at_level(logging.WARNING, logger="storage.cache"):
        cache.replace(key, _blob(3.0))
    assert "replaced cache entry" in caplog.text and store.uri(key) in caplog.text
    assert _value(cache.get(key)) == 3.0
    assert cache.exists(key)
    assert cache.stats() == CacheStats(hits=2, misses=1, writes=1, replaced=1)


def test_write_asset_idempotent(store: ObjectStore) -> None:
    first = png_bytes(_image(), {"edit_id": "e1"})
    second = png_bytes(_image((0, 0, 255)), {"edit_id": "e1"})
    assert not is_finished(store, "e1")
    asset_uri, sidecar_uri, written = write_asset(store, "e1", first, "png", {"target_prompt": "x"})
    assert written is True and is_finished(store, "e1")
    assert asset_uri == store.uri("assets/e1.png") and sidecar_uri == store.uri("assets/e1.json")
    again = write_asset(store, "e1", second, "png", {"target_prompt": "y"})
    assert again == (asset_uri, sidecar_uri, False)
    assert store.get("assets/e1.png") == first
    sidecar = read_json(store, "assets/e1.json")
    assert sidecar == {
        "target_prompt": "x",
        "output_uri": asset_uri,
        "output_sha256": sha256_hex(first),
    }


def test_write_asset_after_crash_keeps_existing_image_of_the_same_edit(store: ObjectStore) -> None:
    """An image left without a sidecar is kept when it embeds the same edit identity (e.g. encoded on
    other hardware), and the sidecar describes that image."""
    earlier = png_bytes(
        _image((10, 20, 30)), {"editflow": '{"edit_id": "e2", "target_prompt": "x"}'}
    )
    new = png_bytes(_image((11, 20, 30)), {"editflow": '{"edit_id": "e2", "target_prompt": "x"}'})
    store.put("assets/e2.png", earlier)
    _, _, written = write_asset(store, "e2", new, "png", {})
    assert written is True
    assert store.get("assets/e2.png") == earlier
    assert read_json(store, "assets/e2.json")["output_sha256"] == sha256_hex(earlier)


@pytest.mark.parametrize(
    "left",
    [b"not an image", png_bytes(Image.new("RGB", (4, 4)), {"editflow": '{"edit_id": "e2", "target_prompt": "old"}'}),
     png_bytes(Image.new("RGB", (4, 4)))],
    ids=["non-image", "other-prompt", "no-identity"],
)  # fmt: skip
def test_write_asset_after_crash_replaces_an_image_of_another_edit(
    store: ObjectStore, left: bytes
) -> None:
    new = png_bytes(_image(), {"editflow": '{"edit_id": "e2", "target_prompt": "new"}'})
    store.put("assets/e2.png", left)
    _, _, written = write_asset(store, "e2", new, "png", {})
    assert written is True and store.get("assets/e2.png") == new
    assert read_json(store, "assets/e2.json")["output_sha256"] == sha256_hex(new)


def test_write_asset_counts_its_own_sidecar_whose_reply_was_lost(store: ObjectStore) -> None:
    """A conditional PUT that landed but whose reply was lost is retried (boto3 does so) and then finds
    the object: when the stored sidecar is the one this call wrote, the edit counts as written."""

    class LostReply(type(store)):  # the same store; each conditional PUT "loses its reply" once
        def put(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
            first = super().put(key, data, if_absent=if_absent)
            return super().put(key, data, if_absent=True) if if_absent and first else first

    lossy = LostReply.__new__(LostReply)
    lossy.__dict__.update(store.__dict__)
    image = png_bytes(_image(), {"editflow": "{}"})
    assert write_asset(lossy, "e4", image, "png", {"k": 1})[2] is True
    assert (
        write_asset(lossy, "e4", image, "png", {"k": 1})[2] is False
    )  # really finished now: skipped
    assert store.get("assets/e4.png") == image


def test_write_asset_rejects_unsafe_id(store: ObjectStore) -> None:
    with pytest.raises(ValueError, match="key-safe"):
        write_asset(store, "../escape", b"x", "png", {})


def test_png_text_chunks_readable() -> None:
    data = png_bytes(
        _image(), {"prompt": "a red circle", "unicode": "café ✓", "editflow": '{"a": 1}'}
    )
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        assert im.text == {"prompt": "a red circle", "unicode": "café ✓", "editflow": '{"a": 1}'}
        assert im.size == (16, 12)


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_encode_image_embeds_text(fmt: str) -> None:
    data = encode_image(_image(), fmt, {"prompt": "a red circle"})  # type: ignore[arg-type]
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        assert im.format == {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}[fmt]
        if fmt == "png":
            text = im.text
        elif fmt == "jpeg":
            text = json.loads(im.info["comment"])
        else:
            text = json.loads(im.getexif()[0x010E])
    assert text == {"prompt": "a red circle"}


def test_encode_image_errors() -> None:
    with pytest.raises(ValueError, match="unknown image format"):
        encode_image(_image(), "gif")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="PNG text keys"):
        png_bytes(_image(), {"": "x"})


def test_parquet_round_trip(store: ObjectStore) -> None:
    table = pa.table({"edit_id": ["a", "b"], "seconds": [1.5, None], "sku": [1, 2]})
    assert write_parquet(store, "runs/r/results/shard-00000.parquet", table) is True
    assert read_parquet(store, "runs/r/results/shard-00000.parquet").equals(table)
    assert (
        write_parquet(
            store, "runs/r/results/shard-00000.parquet", table.slice(0, 1), if_absent=True
        )
        is False
    )
    assert read_parquet(store, "runs/r/results/shard-00000.parquet").num_rows == 2


def test_json_round_trip_and_errors(store: ObjectStore) -> None:
    assert write_json(store, "runs/r/plan.json", {"b": 1, "a": [1, 2]}) is True
    assert read_json(store, "runs/r/plan.json") == {"a": [1, 2], "b": 1}
    assert write_json(store, "runs/r/plan.json", {}, if_absent=True) is False
    store.put("bad.json", b"{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_json(store, "bad.json")


def test_to_jsonable() -> None:
    import numpy as np

    value = {
        "nan": math.nan,
        "when": dt.datetime(2025, 1, 2, 3, 4, 5),
        "np": np.float32(0.5),
        "arr": np.arange(3),
        "tuple": (1, 2),
        "bytes": b"\x00\x01",
        1: "int key",
    }
    assert to_jsonable(value) == {
        "nan": None,
        "when": "2025-01-02T03:04:05",
        "np": 0.5,
        "arr": [0, 1, 2],
        "tuple": [1, 2],
        "bytes": "AAE=",
        "1": "int key",
    }
