"""Run options shared by planning and shard tasks: a frozen, JSON-ready dataclass passed by value."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from editing.model import SIZE_POLICIES
from storage.keys import IMAGE_FORMATS


def default_model() -> str:
    """The bundled reference model's folder (the CLI default)."""
    from refmodel import REFERENCE_MODEL_DIR

    return str(REFERENCE_MODEL_DIR)


@dataclass(frozen=True)
class RunOptions:
    """How a run edits and where it keeps things. Every field is a plain value (tasks hash their inputs)."""

    out: str  # output root URI: local folder, file:// or s3://bucket/prefix
    model: str = ""  # diffusers folder or hub id; "" = the bundled reference model
    cache: str = ""  # inversion cache root; "" = {out}/cache
    s3_endpoint: str | None = (
        None  # custom S3 endpoint (else AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL)
    )
    device: str | None = None  # None = CUDA if available, else CPU
    dtype: str | None = None  # "float16" / "bfloat16" / "float32"; None = fp16 on CUDA, fp32 on CPU
    allow_pickle: bool = False  # load pickle-only checkpoints (they can run code)
    image_format: str = "png"  # output format
    max_batch: int = 8  # targets per UNet batch (rows = 2 x targets + sources)
    inversion_guidance: float = (
        7.5  # the source branch's guidance: Direct Inversion corrections are exact for it
    )
    size_policy: str = "fit"  # editing.model.EditModel.prepare_image's rule
    cache_features: bool = False  # also cache PnP source features (see benchmarks/feature_cache.py)
    threads: int | None = (
        None  # CPU intra-op threads per worker process; None = the policy (tasks.worker.apply_thread_policy)
    )

    def __post_init__(self) -> None:
        if not self.out:
            raise ValueError("out must be a URI or a folder")
        if self.image_format not in IMAGE_FORMATS:
            raise ValueError(
                f"image_format must be one of {IMAGE_FORMATS}, got {self.image_format!r}"
            )
        if self.size_policy not in SIZE_POLICIES:
            raise ValueError(
                f"size_policy must be one of {SIZE_POLICIES}, got {self.size_policy!r}"
            )
        if not isinstance(self.max_batch, int) or self.max_batch < 1:
            raise ValueError(f"max_batch must be a positive integer, got {self.max_batch!r}")
        if self.threads is not None and (
            not isinstance(self.threads, int) or isinstance(self.threads, bool) or self.threads < 1
        ):
            raise ValueError(f"threads must be a positive integer or None, got {self.threads!r}")
        if self.dtype not in (None, "float16", "bfloat16", "float32", "float64"):
            raise ValueError(
                f"dtype must be float16, bfloat16, float32 or float64, got {self.dtype!r}"
            )

    @property
    def model_ref(self) -> str:
        return self.model or default_model()

    @property
    def cache_uri(self) -> str:
        return self.cache or self.out.rstrip("/") + "/cache"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunOptions:
        return cls(**data)
