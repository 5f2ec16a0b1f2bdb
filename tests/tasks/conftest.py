"""Fixtures for the shard-step tests: the tiny SD-shaped model (random weights) loaded as a worker loads
it, source images and planned runs in real stores (a local folder, and S3 through the moto server)."""

from __future__ import annotations

import io
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from refmodel.toy import TINY, build_toy_pipeline
from storage import ObjectStore, keys, open_store
from storage.writer import read_json, write_parquet
from tasks.options import RunOptions
from tasks.planning import plan_run
from tasks.shard import ShardRows, load_shard

STEPS = 2  # the steps under test are orchestration; two denoising steps exercise every branch


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> str:
    return str(build_toy_pipeline(tmp_path_factory.mktemp("tasks-model"), TINY, seed=3))


@pytest.fixture(scope="session")
def model(model_dir):
    """The tiny model through the worker's per-process cache (as ``run_shard`` gets it)."""
    from tasks.worker import get_model

    return get_model(model_dir, device="cpu", dtype="float32")


def png_bytes(seed: int, size: int = 32) -> bytes:
    rng = np.random.default_rng(seed)
    small = rng.uniform(0, 255, size=(4, 4, 3)).astype(np.uint8)
    image = Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class Run:
    """A planned run: its options, id, output store and its plan (``plan.json``)."""

    options: RunOptions
    run_id: str
    out: ObjectStore
    plan: dict

    def shard(self, index: int = 0) -> ShardRows:
        return load_shard(self.out, self.run_id, index)


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path: Path) -> str:
    """The URI of a fresh, empty store root: a local folder or a prefix of a fresh S3 bucket."""
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("s3_bucket")


@pytest.fixture
def local_root_uri(tmp_path: Path) -> str:
    return str(tmp_path / "root")


@pytest.fixture
def make_run(model_dir, request):
    """``make_run(root, rows, **options)``: store the images the rows name under the root (``"img:N"``: a
    PNG of seed N, ``"junk:N"``: bytes that are no image, ``"missing:N"``: no object), write the manifest,
    plan it; returns a :class:`Run`."""

    def make(root: str, rows: list[dict], *, shard_size: int = 64, **opts) -> Run:
        endpoint = request.getfixturevalue("s3_server") if root.startswith("s3://") else None
        store = open_store(root, s3_endpoint=endpoint)
        resolved = []
        for row in rows:
            row = {"num_steps": STEPS, "method": "pnp"} | row
            kind, _, name = row["image_uri"].partition(":")
            if kind in ("img", "junk", "missing"):
                key = f"images/{kind}-{name}.png"
                if kind == "img":
                    store.put(key, png_bytes(int(name)))
                elif kind == "junk":
                    store.put(key, b"not an image")
                row["image_uri"] = store.uri(key)
            resolved.append(row)
        write_parquet(store, "manifest.parquet", pa.Table.from_pylist(resolved))
        options = RunOptions(out=store.uri("out"), model=model_dir, s3_endpoint=endpoint,
                             device="cpu", dtype="float32", **opts)  # fmt: skip
        run_id = f"t-{uuid.uuid4().hex[:8]}"
        plan_run(store.uri("manifest.parquet"), options, run_id=run_id, shard_size=shard_size)
        out = open_store(options.out, s3_endpoint=endpoint)
        return Run(options, run_id, out, read_json(out, keys.plan_key(run_id)))

    return make


def row(image: str, target: str = "a blue circle", source: str = "a red circle", **kw) -> dict:
    """One manifest row (PnP, STEPS steps unless given)."""
    return {"image_uri": image, "source_prompt": source, "target_prompt": target} | kw
