"""Writing outputs: encoded images with embedded text, JSON sidecars, Parquet and JSON files.

``write_asset`` is the idempotent output write: image first, sidecar last (the sidecar is the
"finished" marker), both first-writer-wins, so a finished edit is never rewritten.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import decimal
import io
import json
import logging
import math
import os
from collections.abc import Mapping
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, PngImagePlugin

from storage.base import NotFound, ObjectStore
from storage.keys import IMAGE_FORMATS, asset_key, sha256_hex, sidecar_key

__all__ = [
    "IMAGE_FORMATS",
    "png_bytes",
    "encode_image",
    "to_jsonable",
    "json_bytes",
    "write_asset",
    "embedded_identity",
    "is_finished",
    "write_json",
    "read_json",
    "write_parquet",
    "read_parquet",
]

logger = logging.getLogger(__name__)

ImageFormat = Literal["png", "jpeg", "webp"]
_EXIF_IMAGE_DESCRIPTION = 0x010E
EMBED_KEY = "editflow"  # the text item holding an asset's edit identity (see tasks.shard)


def png_bytes(image: Image.Image, text: Mapping[str, str] | None = None) -> bytes:
    """`image` as PNG with each ``text`` item in a text chunk (tEXt; iTXt if not Latin-1)."""
    info = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        if not 1 <= len(key) <= 79:
            raise ValueError(f"PNG text keys must be 1-79 characters, got {key!r}")
        info.add_text(key, str(value))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def encode_image(
    image: Image.Image,
    fmt: ImageFormat = "png",
    text: Mapping[str, str] | None = None,
    *,
    quality: int = 95,
) -> bytes:
    """Encode `image` as PNG, JPEG or WebP, embedding `text`.

    PNG: one text chunk per item. JPEG: the items as a JSON object in the COM segment
    (``Image.open(...).info["comment"]``). WebP: the JSON in EXIF ImageDescription.
    ``quality`` (1-100) applies to JPEG and WebP.
    """
    fmt = fmt.lower()  # type: ignore[assignment]
    if fmt == "png":
        return png_bytes(image, text)
    if fmt not in IMAGE_FORMATS:
        raise ValueError(f"unknown image format {fmt!r}; known: {IMAGE_FORMATS}")
    payload = json.dumps(dict(text or {}), sort_keys=True, ensure_ascii=True)
    buf = io.BytesIO()
    rgb = image.convert("RGB") if image.mode not in ("RGB", "L") else image
    if fmt == "jpeg":
        rgb.save(buf, format="JPEG", quality=quality, comment=payload.encode("ascii"))
    else:
        exif = Image.Exif()
        exif[_EXIF_IMAGE_DESCRIPTION] = payload
        rgb.save(buf, format="WEBP", quality=quality, exif=exif.tobytes())
    return buf.getvalue()


def to_jsonable(value: Any) -> Any:
    """`value` made JSON-safe: NaN/inf -> None, dates -> ISO text, bytes -> base64, numpy
    scalars -> Python numbers, tuples/sets -> lists, dataclasses -> dicts, keys -> str."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((to_jsonable(v) for v in value), key=repr)
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return to_jsonable(float(value))
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(dataclasses.asdict(value))
    if hasattr(value, "tolist") and callable(value.tolist):  # numpy/torch scalars and small arrays
        return to_jsonable(value.tolist())
    return str(value)


def json_bytes(obj: Any) -> bytes:
    """Pretty, key-sorted UTF-8 JSON of :func:`to_jsonable` (`obj`)."""
    text = json.dumps(
        to_jsonable(obj), sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False
    )
    return (text + "\n").encode("utf-8")


def write_json(store: ObjectStore, key: str, obj: Any, *, if_absent: bool = False) -> bool:
    """Write `obj` as JSON (see :func:`json_bytes`); returns whether it was written."""
    return store.put(key, json_bytes(obj), if_absent=if_absent)


def read_json(store: ObjectStore, key: str) -> Any:
    """The JSON value stored under `key` (``ValueError`` naming the URI if it is not JSON)."""
    data = store.get(key)
    try:
        return json.loads(data)
    except ValueError as exc:
        raise ValueError(f"{store.uri(key)} is not valid JSON: {exc}") from None


def write_parquet(
    store: ObjectStore, key: str, table: pa.Table, *, if_absent: bool = False
) -> bool:
    """Write `table` as one Parquet object (zstd); returns whether it was written."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return store.put(key, sink.getvalue().to_pybytes(), if_absent=if_absent)


def read_parquet(store: ObjectStore, key: str) -> pa.Table:
    """The Parquet object under `key` as a table."""
    return pq.read_table(pa.BufferReader(store.get(key)))


def is_finished(store: ObjectStore, edit_id: str) -> bool:
    """Whether `edit_id` has its sidecar (written last, so the edit is complete)."""
    return store.exists(sidecar_key(edit_id))


def write_asset(
    store: ObjectStore,
    edit_id: str,
    image_bytes: bytes,
    ext: str,
    metadata: Mapping[str, Any],
) -> tuple[str, str, bool]:
    """Write an edited image and then its JSON sidecar; returns ``(asset_uri, sidecar_uri, written)``.

    Both writes are first-writer-wins, so a finished edit is never rewritten: ``written`` is
    False when the sidecar already existed or another writer's sidecar won. If an earlier
    attempt left the image without a sidecar, that image is kept. The sidecar holds
    `metadata` plus ``output_uri`` and ``output_sha256`` of the image actually stored.
    """
    akey, skey = asset_key(edit_id, ext), sidecar_key(edit_id)
    asset_uri, sidecar_uri = store.uri(akey), store.uri(skey)
    orphan = False  # a sidecar whose image was deleted: not finished, so redone and replaced
    if store.exists(skey):
        if store.exists(akey):
            logger.debug("edit %s already finished; not rewriting", edit_id)
            return asset_uri, sidecar_uri, False
        orphan = True
    output_sha256 = sha256_hex(image_bytes)
    if not store.put(akey, image_bytes, if_absent=True):
        # an earlier (crashed or racing) attempt stored an image: keep it only if it is this edit
        found, identity = store.get(akey), embedded_identity(image_bytes)
        if found == image_bytes or (identity is not None and embedded_identity(found) == identity):
            output_sha256 = sha256_hex(found)
            logger.info(
                "edit %s: image already stored without a sidecar, same edit; keeping it", edit_id
            )
        else:
            logger.warning(
                "edit %s: %s was stored without a sidecar and is not this edit; replacing it",
                edit_id,
                asset_uri,
            )
            store.put(akey, image_bytes)
    sidecar = json_bytes({**metadata, "output_uri": asset_uri, "output_sha256": output_sha256})
    written = store.put(skey, sidecar, if_absent=not orphan)
    if not written:
        try:
            ours = store.get(skey) == sidecar  # our own earlier attempt whose reply was lost
        except NotFound:
            ours = False
        if ours:
            logger.info("edit %s: the sidecar write had landed though its reply was lost", edit_id)
            written = True
        else:
            logger.info("edit %s: another writer finished it first", edit_id)
    return asset_uri, sidecar_uri, written


def embedded_identity(data: bytes) -> str | None:
    """The "editflow" text :func:`encode_image` embedded in an image (PNG text chunk, JPEG comment,
    WebP EXIF description), or None when `data` is no image or has none."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format == "PNG":
                im.load()
                value = im.text.get(EMBED_KEY)
                return str(value) if value is not None else None
            if im.format == "JPEG":
                payload = im.info.get("comment", b"")
            elif im.format == "WEBP":
                payload = im.getexif().get(_EXIF_IMAGE_DESCRIPTION, "")
            else:
                return None
        text = json.loads(payload.decode("ascii") if isinstance(payload, bytes) else payload)
        value = text.get(EMBED_KEY) if isinstance(text, dict) else None
        return str(value) if value is not None else None
    except Exception:  # noqa: BLE001 - not an image, or no readable text: nothing embedded
        return None
