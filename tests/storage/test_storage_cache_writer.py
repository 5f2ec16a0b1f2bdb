"""BlobCache, the idempotent asset writer, image encoding with text, Parquet and JSON files."""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import math

import pyarrow as pa
import pytest
from PIL import Image

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


def test_blob_cache_hit_miss_replace(store: ObjectStore, caplog: pytest.LogCaptureFixture) -> None:
    cache = BlobCache(store)
    key = inversion_object_key(inversion_key(sha256_hex(b"img"), {"model_id": "m"}))
    assert cache.get(key) is None
    assert cache.put(key, b"first") is True
    assert cache.put(key, b"second") is False  # first writer wins
    assert cache.get(key) == b"first"
    with caplog.at_level(logging.WARNING, logger="storage.cache"):
        cache.replace(key, b"fixed")
    assert "replaced cache entry" in caplog.text and store.uri(key) in caplog.text
    assert cache.get(key) == b"fixed"
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


def test_write_asset_after_crash_keeps_existing_image(store: ObjectStore) -> None:
    """An image left without a sidecar is kept, and the sidecar describes that image."""
    store.put("assets/e2.png", b"earlier attempt")
    _, _, written = write_asset(store, "e2", b"new attempt", "png", {})
    assert written is True
    assert store.get("assets/e2.png") == b"earlier attempt"
    assert read_json(store, "assets/e2.json")["output_sha256"] == sha256_hex(b"earlier attempt")


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
