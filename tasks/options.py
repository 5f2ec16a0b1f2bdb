"""Run options: THE object a run's flows and tasks pass whole (frozen, JSON-ready, pickles for Dask; Prefect
validates a dict given for it, e.g. a deployment's parameters). Defaults are defined here, once."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from editing.configs import COMPILE_MODES, DEFAULT_MAX_BATCH
from manifests.build import DEFAULT_TEMPLATE
from manifests.schema import DEFAULT_METHOD
from storage.endpoints import check_endpoint
from storage.keys import IMAGE_FORMATS
from storage.uri import DEFAULT_MAX_SOURCE_BYTES

DEFAULT_SHARD_SIZE = 64  # edits per shard task
DTYPES = ("float16", "bfloat16", "float32")  # the --dtype choices; None = fp16 on CUDA, fp32 on CPU
_ACCEPTED_DTYPES = (None, *DTYPES, "float64")  # float64 too, for numerical checks through the API
OUTPUT_SIZES = ("source", "model")  # the --output-size choices (RunOptions.output_size)
# derived contrast prompts a run may ask for: at the judge's default 4 samples per prompt, the target, the
# source and 2 derived prompts keep edit QA within 16 UNet evaluations per edit (issue 22's cost target)
MAX_QA_DERIVED = 2


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
    # a hub id's commit, branch or tag (None = main); the CLI pins it to the resolved commit before the
    # run, so that every worker (Dask included) loads exactly that snapshot
    revision: str | None = None
    download: bool = False  # fetch a hub id (and hub LoRAs) missing from the HF cache, once
    # LoRA adapters "FILE_OR_ID[@SCALE]", fused in order into the model for the run
    loras: tuple[str, ...] = ()
    # a single-file --model's diffusers config folder (configs + tokenizer); "" = the bundled model's
    model_config: str = ""
    image_format: str = IMAGE_FORMATS[0]  # output format, one of IMAGE_FORMATS
    max_batch: int = DEFAULT_MAX_BATCH  # targets per UNet batch (rows = 2 x targets + sources)
    # edits per shard task (planning packs sources into shards); None = chosen by planning for the
    # manifest: DEFAULT_SHARD_SIZE, or more so that a run has at most ~10k shards
    shard_size: int | None = None
    inversion_guidance: float = (
        7.5  # the source branch's guidance: Direct Inversion corrections are exact for it
    )
    size_policy: str = "fit"  # editing.model.EditModel.prepare_image's rule
    # "source": each edit is resized back to its source's pixel size (EditModel.restore_image), a drop-in
    # replacement for the catalog's image; "model": the edit as the model made it (~native area, sides
    # multiples of the VAE factor). The sidecar records both sizes either way.
    output_size: str = "source"
    # bytes a source image may hold; a larger one is a row error (storage.uri explains the default)
    max_source_bytes: int = DEFAULT_MAX_SOURCE_BYTES
    cache_features: bool = False  # also cache PnP source features (see benchmarks/feature_cache.py)
    threads: int | None = (
        None  # CPU intra-op threads per worker process; None = the policy (tasks.worker.apply_thread_policy)
    )
    # the edit-QA review gate (editing.judge.parse_gate): "text>=X" (rules joined by ","), or "off" (no
    # judging at all, no cost); None = editing.judge.DEFAULT_GATE. Kept as the gate's canonical spec.
    qa: str | None = None
    # the CLIP model of edit QA's second score (editing.clip_judge; a hub id or a folder): CLIP directional
    # similarity per edit, the results' qa_clip, gate rules "clip>=X"; None = not scored (no cost)
    qa_model: str | None = None
    # contrast prompts the judge derives from a word-swap prompt pair (editing.contrasts) for an edit without a
    # qa_contrast of its own: 4 UNet evaluations each; 0 = none (the default: calibration did not prefer them)
    qa_derived: int = 0

    # torch.compile of the controlled UNet, one of COMPILE_MODES ("reduce-overhead": CUDA graphs, CUDA
    # only); "off" by default: a compile costs minutes and pays off on long GPU runs (README: GPU levers)
    compile: str = "off"

    def __post_init__(self) -> None:
        from editing.gate import DEFAULT_GATE, DERIVED_RULE, parse_gate
        from editing.model import SIZE_POLICIES  # here, not at import: editing.model imports torch
        from editing.model_forms import parse_lora

        if isinstance(self.loras, str):
            raise ValueError(
                f"loras must be a list of FILE_OR_ID[@SCALE], got the string {self.loras!r}"
            )
        object.__setattr__(self, "loras", tuple(str(x) for x in self.loras))
        for lora in self.loras:
            parse_lora(lora)
        if not self.out:
            raise ValueError("out must be a URI or a folder")
        if self.s3_endpoint:  # before a flow run records it: no credentials in it ("" = unset)
            check_endpoint(self.s3_endpoint, what="s3_endpoint")
        if self.image_format not in IMAGE_FORMATS:
            raise ValueError(
                f"image_format must be one of {IMAGE_FORMATS}, got {self.image_format!r}"
            )
        if self.size_policy not in SIZE_POLICIES:
            raise ValueError(
                f"size_policy must be one of {SIZE_POLICIES}, got {self.size_policy!r}"
            )
        if self.output_size not in OUTPUT_SIZES:
            raise ValueError(f"output_size must be one of {OUTPUT_SIZES}, got {self.output_size!r}")
        if not isinstance(self.max_batch, int) or self.max_batch < 1:
            raise ValueError(f"max_batch must be a positive integer, got {self.max_batch!r}")
        if not isinstance(self.max_source_bytes, int) or self.max_source_bytes < 1:
            raise ValueError(
                f"max_source_bytes must be a positive integer, got {self.max_source_bytes!r}"
            )
        if self.shard_size is not None and (
            not isinstance(self.shard_size, int)
            or isinstance(self.shard_size, bool)
            or self.shard_size < 1
        ):
            raise ValueError(
                f"shard_size must be a positive integer or None (auto), got {self.shard_size!r}"
            )
        if self.threads is not None and (
            not isinstance(self.threads, int) or isinstance(self.threads, bool) or self.threads < 1
        ):
            raise ValueError(f"threads must be a positive integer or None, got {self.threads!r}")
        # a bad spec: a ValueError that quotes it and says what a spec looks like
        if (
            not isinstance(self.qa_derived, int)
            or isinstance(self.qa_derived, bool)
            or not 0 <= self.qa_derived <= MAX_QA_DERIVED
        ):
            raise ValueError(
                f"qa_derived must be an integer from 0 to {MAX_QA_DERIVED}, got {self.qa_derived!r}"
            )
        default = DEFAULT_GATE + ("," + DERIVED_RULE if self.qa_derived else "")
        gate = parse_gate(default if self.qa is None else self.qa)
        object.__setattr__(self, "qa", gate.spec)
        if self.qa_derived and gate.enabled and not any(r.metric == "derived" for r in gate.rules):
            raise ValueError(
                f"qa_derived={self.qa_derived}: the QA gate {gate.spec!r} has no 'derived' rule for the "
                f"edits judged with derived contrasts: add one, e.g. {DERIVED_RULE!r} (or leave --qa out)"
            )
        if self.qa_model is not None and (not isinstance(self.qa_model, str) or not self.qa_model):
            raise ValueError(
                f"qa_model must be a CLIP model's hub id or folder, got {self.qa_model!r}"
            )
        if any(r.metric == "clip" for r in gate.rules) and not self.qa_model:
            raise ValueError(
                f"QA gate spec {gate.spec!r} has a clip rule but no CLIP model: give --qa-model"
            )
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {COMPILE_MODES}, got {self.compile!r}")
        if self.dtype not in _ACCEPTED_DTYPES:
            raise ValueError(
                f"dtype must be float16, bfloat16, float32 or float64, got {self.dtype!r}"
            )

    @property
    def model_ref(self) -> str:
        return self.model or default_model()

    @property
    def config_ref(self) -> str:
        """The config folder of a single-file model (configs and tokenizer)."""
        return self.model_config or default_model()

    @property
    def tokenizer_ref(self) -> str:
        """Where the model's tokenizer is: the model, or a single-file model's config folder."""
        from editing.model_forms import is_single_file

        return self.config_ref if is_single_file(self.model_ref) else self.model_ref

    def model_args(self) -> dict[str, Any]:
        """The keyword arguments of :func:`tasks.worker.get_model` (and ``load_model``) besides device/dtype."""
        return {
            "allow_pickle": self.allow_pickle,
            "revision": self.revision,
            "download": self.download,
            "loras": self.loras,
            "config": self.config_ref,
            "compile": self.compile,
        }

    @property
    def cache_uri(self) -> str:
        return self.cache or self.out.rstrip("/") + "/cache"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunOptions:
        return cls(**data)


@dataclass(frozen=True)
class RestyleSpec:
    """What ``restyle`` makes of a catalog: one manifest row per (catalog row, style), catalog order then
    style order (:func:`manifests.build.restyle_manifest`)."""

    styles: tuple[str, ...]  # a list is taken too (kept as a tuple)
    template: str = DEFAULT_TEMPLATE  # the target prompt, from {caption} and {style}
    method: str = DEFAULT_METHOD
    image_column: str = "image_uri"  # the catalog's columns
    caption_column: str = "caption"
    settings: str | None = None  # the method's settings for every row, a JSON object

    def __post_init__(self) -> None:
        if isinstance(self.styles, str):
            raise ValueError(f"styles must be a list of styles, got the string {self.styles!r}")
        object.__setattr__(self, "styles", tuple(self.styles))

    def style_of(self, row: int) -> tuple[int, str]:
        """(catalog row, style) of manifest row `row`."""
        n = len(self.styles)
        return row // n, self.styles[row % n]
