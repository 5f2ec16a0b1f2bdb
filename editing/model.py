"""Loading a Stable Diffusion 1.x/2.x checkpoint once, and the small model-level helpers the methods share.

`load_model` takes a local diffusers folder or a hub id (from the local cache; nothing downloads unless the
caller allows it), refuses pickle-only weights unless asked, and picks device and dtype sensibly. The VAE's
precision is chosen once, at load (:func:`vae_precision`); nothing here moves or re-casts a module later.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

if TYPE_CHECKING:
    from editing.model_forms import LoraSpec

logger = logging.getLogger(__name__)

SIZE_POLICIES = ("fit", "square", "exact")
# the sizing rule's version, part of an inversion's facts: cached inversions made under another rule
# (before 2: sides rounded to whole UNet cells, remainder cropped) are recomputed, not reused
SIZE_RULE = 2
_COMPONENTS = ("unet", "vae", "text_encoder")


class PickleWeightsRefused(ValueError):
    """The checkpoint only has pickle (.bin/.ckpt) weights and the caller did not opt in."""


def vae_precision(dtype: torch.dtype, vae_config: Any) -> torch.dtype:
    """The dtype the VAE runs in for a model running in `dtype`: the one precision rule.

    fp32 when the model runs in fp16 and the VAE's config sets ``force_upcast`` (missing counts as set, as in
    diffusers): SD 1.x/2.x VAEs overflow to NaN/inf in fp16, which is why diffusers' pipelines upcast them
    at decode time. Every other case (fp32, fp64, bf16 whose range does not overflow, or a VAE with
    ``force_upcast`` false such as an fp16-fixed one) runs the VAE in the model's dtype.
    :func:`load_model` applies this once; pass the same rule when building an :class:`EditModel` by hand.
    """
    get = (
        vae_config.get
        if hasattr(vae_config, "get")
        else lambda k, d=None: getattr(vae_config, k, d)
    )
    if dtype == torch.float16 and get("force_upcast", True):
        return torch.float32
    return dtype


@dataclass
class EditModel:
    """A loaded SD pipeline's parts plus identity facts. Load once with :func:`load_model`; reuse it.

    `vae_dtype` is the dtype the VAE runs in (see :func:`vae_precision`); left out, it is the VAE's own
    dtype as given. It must match the VAE's parameters: nothing casts the VAE after construction.
    """

    vae: Any
    unet: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any  # a DDIMScheduler; only its schedule is used, the step math is ours
    device: torch.device
    dtype: torch.dtype
    model_id: str
    revision: str
    defaults: dict[str, Any] = field(
        default_factory=dict
    )  # from the folder's editflow.json, if any
    vae_dtype: torch.dtype | None = None  # the VAE's precision; None = the VAE's parameters' dtype
    # GPU levers (README: GPU levers), each a switch; the defaults keep outputs as they always were.
    # the layers no editing processor controls run fused SDPA (False: diffusers' classic AttnProcessor)
    sdpa: bool = True
    # latents per VAE decode call; 0 = a chunk's targets in one call (in the VAE's precision either way)
    decode_batch: int = 8
    # the UNet's torch.compile mode (compile_unet sets it); when not "off", the engine runs every UNet
    # batch at a padded, fixed shape so that the compiled graphs are reused
    compiled: str = "off"
    _prompt_cache: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        have = self.vae.dtype
        if self.vae_dtype is None:
            self.vae_dtype = have
        elif have != self.vae_dtype:
            raise ValueError(
                f"vae_dtype is {self.vae_dtype} but the VAE's parameters are {have}; cast the VAE first"
            )

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def native_size(self) -> int:
        """Pixel side the UNet was trained at (SD 1.x: 512, SD 2.x-v: 768)."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this (SD: 8 for the VAE x 8 for the UNet's 3 downsamples = 64)."""
        return self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    @property
    def prediction_type(self) -> str:
        return str(self.scheduler.config.prediction_type)

    @property
    def max_tokens(self) -> int:
        return int(self.tokenizer.model_max_length)

    def scheduler_facts(self) -> dict[str, Any]:
        """The scheduler settings an inversion depends on (part of its cache key)."""
        cfg = self.scheduler.config
        keys = (
            "num_train_timesteps",
            "beta_start",
            "beta_end",
            "beta_schedule",
            "prediction_type",
            "set_alpha_to_one",
            "steps_offset",
            "timestep_spacing",
            "rescale_betas_zero_snr",
        )
        return {k: cfg.get(k) for k in keys}

    # ---- text ----
    def tokenize(self, prompt: str) -> torch.Tensor:
        """Token ids (1, L) padded to the tokenizer's length; a prompt that does not fit is refused."""
        ids = self.tokenizer(
            prompt, padding="max_length", truncation=False, return_tensors="pt"
        ).input_ids
        if ids.shape[1] > self.max_tokens:
            raise ValueError(
                f"prompt is too long: {ids.shape[1]} tokens, the model takes {self.max_tokens}: {prompt!r}"
            )
        return ids

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Text embeddings (N, L, D) in the model's dtype; each distinct prompt is encoded once."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._prompt_cache]
        if missing:
            ids = torch.cat([self.tokenize(p) for p in missing]).to(self.device)
            emb = self.text_encoder(ids)[0].to(self.dtype)
            if len(self._prompt_cache) > 4096:  # bound the memo on long runs
                self._prompt_cache.clear()
            for p, e in zip(missing, emb):
                self._prompt_cache[p] = e
        return torch.stack([self._prompt_cache[p] for p in prompts])

    # ---- images ----
    @property
    def pixel_multiple(self) -> int:
        """Image sides are brought to multiples of this: one latent cell (the VAE factor, 8 px for SD).

        diffusers' ``UNet2DConditionModel`` takes any latent size (it upsamples to each skip connection's
        size when a side is not a multiple of ``2 ** downsamples``, as diffusers' SD pipelines rely on for
        8 px multiples); another UNet gets :attr:`size_multiple`.
        """
        from diffusers import UNet2DConditionModel

        if isinstance(self.unet, UNet2DConditionModel):
            return self.vae_scale_factor
        return self.size_multiple

    def target_size(self, width: int, height: int, size_policy: str = "fit") -> tuple[int, int]:
        """(width, height) an image of this size is brought to; see :meth:`prepare_image`."""
        m = self.pixel_multiple
        if size_policy == "exact":
            if width % m or height % m:
                raise ValueError(
                    f"image is {width}x{height}; size_policy 'exact' needs multiples of {m}"
                )
            return width, height
        if size_policy == "square":
            return self.native_size, self.native_size
        if size_policy == "fit":
            scale = self.native_size / (width * height) ** 0.5
            w = max(m, int(round(width * scale / m)) * m)
            h = max(m, int(round(height * scale / m)) * m)
            return w, h
        raise ValueError(f"size_policy must be one of {SIZE_POLICIES}, got {size_policy!r}")

    def source_region(self, width: int, height: int, size_policy: str = "fit") -> tuple[int, int]:
        """(width, height) in source pixels of what :meth:`prepare_image` keeps of a `width` x `height`
        image: all of it, except 'square', which keeps the centred square of the shorter side."""
        if size_policy == "square":
            side = min(width, height)
            return side, side
        return width, height

    def prepare_image(self, image: Image.Image, size_policy: str = "fit") -> torch.Tensor:
        """An RGB image as a (1, 3, H, W) tensor in [-1, 1].

        The one rule: 'fit' (default) keeps the aspect ratio within one latent cell: it scales the area to
        the model's native resolution squared and rounds each side to the nearest multiple of
        :attr:`pixel_multiple`, resizing (Lanczos) to exactly that, so every source pixel is kept and
        :meth:`restore_image` maps the edit back onto the source; 'square' resizes the shorter side to the
        native size and centre-crops a square; 'exact' takes the image as it is (sides must already be
        multiples). An image already at its target size is not resampled.
        """
        image = image.convert("RGB")
        w, h = self.target_size(image.width, image.height, size_policy)
        if (image.width, image.height) != (w, h):
            if size_policy == "square":
                scale = max(w / image.width, h / image.height)
                rw, rh = max(w, round(image.width * scale)), max(h, round(image.height * scale))
                image = image.resize((rw, rh), Image.Resampling.LANCZOS)
                left, top = (rw - w) // 2, (rh - h) // 2
                image = image.crop((left, top, left + w, top + h))
            else:
                image = image.resize((w, h), Image.Resampling.LANCZOS)
        arr = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
        return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0)

    def restore_image(
        self, image: Image.Image, source_size: tuple[int, int], size_policy: str = "fit"
    ) -> Image.Image:
        """An edit (model-side image) at the pixel size of the source region it shows
        (:meth:`source_region` of `source_size`), resized with Lanczos; returned as is when it already
        has that size."""
        size = self.source_region(*source_size, size_policy)
        if image.size == size:
            return image
        return image.resize(size, Image.Resampling.LANCZOS)

    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """VAE-encode (B, 3, H, W) pixels in [-1, 1] to scaled latents (fp32 or wider; posterior mean)."""
        dist = self.vae.encode(pixels.to(self.device, self.vae_dtype)).latent_dist
        return dist.mean.to(self.latent_dtype) * float(self.vae.config.scaling_factor)

    @property
    def latent_dtype(self) -> torch.dtype:
        """Latents and their arithmetic: fp32, or fp64 for an fp64 model (used by exactness tests)."""
        return torch.promote_types(self.dtype, torch.float32)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> list[Image.Image]:
        """Decode scaled latents (B, C, h, w) to PIL images."""
        images = []
        for z in latents.split(self.decode_batch or max(1, len(latents))):
            x = self.vae.decode(
                z.to(self.device, self.vae_dtype) / float(self.vae.config.scaling_factor)
            ).sample
            x = (
                ((x.float().clamp(-1, 1) + 1) * 127.5)
                .round()
                .to(torch.uint8)
                .permute(0, 2, 3, 1)
                .cpu()
                .numpy()
            )
            images.extend(Image.fromarray(a) for a in x)
        return images


def set_channels_last(model: EditModel, on: bool) -> None:
    """The channels-last lever: the UNet's weights (and so its convolutions) in channels-last memory
    format, or back to contiguous. Values are unchanged; only the kernels chosen differ."""
    fmt = torch.channels_last if on else torch.contiguous_format
    model.unet.to(memory_format=fmt)


# graphs a compiled UNet may keep per code object: one per (padded batch shape, method and its
# controls), inversion's too; past dynamo's default (8) a frame silently runs eager
COMPILE_RECOMPILE_LIMIT = 64


def padded_rows(rows: int) -> int:
    """The fixed batch shape a chunk (or an inversion call) of `rows` rows runs at: the next power of two (so a compiled or
    graph-captured UNet sees at most log2(working batch) + 1 shapes)."""
    if rows < 1:
        raise ValueError(f"a chunk needs at least one row, got {rows}")
    return 1 << (rows - 1).bit_length()


def compile_unet(model: EditModel, mode: str, *, backend: str | Any = "inductor") -> str:
    """``torch.compile`` the model's UNet in place (``nn.Module.compile``): the editing processors and
    feature hooks installed per chunk run inside its graph, which reads the step from a device tensor
    (:class:`editing.attention.ControlState`), so a graph is made per padded batch shape and method, not
    per step or chunk. `mode`: one of :data:`editing.configs.COMPILE_MODES`; "reduce-overhead" (CUDA
    graphs) off CUDA falls back to "default" with one log line. Returns the mode in force."""
    from editing.configs import COMPILE_MODES

    if mode not in COMPILE_MODES:
        raise ValueError(f"compile must be one of {COMPILE_MODES}, got {mode!r}")
    if mode == "off":
        return mode
    if mode == "reduce-overhead" and model.device.type != "cuda":
        logger.warning(
            "compile 'reduce-overhead' (CUDA graphs) needs a CUDA device; the UNet on %s is "
            "compiled with mode 'default' instead",
            model.device,
        )
        mode = "default"
    import torch._dynamo

    limit = torch._dynamo.config.recompile_limit
    torch._dynamo.config.recompile_limit = max(limit, COMPILE_RECOMPILE_LIMIT)
    options = {"mode": mode} if backend == "inductor" else {}  # modes are inductor's
    model.unet.compile(backend=backend, dynamic=False, **options)
    model.compiled = mode
    logger.info("UNet compiled (mode %s, backend %s)", mode, backend)
    return mode


def _default_device_dtype(
    device: str | torch.device | None, dtype: torch.dtype | None
) -> tuple[torch.device, torch.dtype]:
    dev = (
        torch.device(device)
        if device is not None
        else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    if dtype is None:
        dtype = torch.float16 if dev.type == "cuda" else torch.float32
    return dev, dtype


def _local_fingerprint(folder: Path) -> str:
    """A revision for a local folder: configs plus each weight file's name, size, head and tail."""
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or path.name.startswith("."):
            continue
        rel = path.relative_to(folder).as_posix()
        h.update(rel.encode())
        if path.suffix in (".json", ".txt"):
            h.update(path.read_bytes())
        elif path.suffix in (".safetensors", ".bin", ".ckpt", ".pt"):
            size = path.stat().st_size
            h.update(str(size).encode())
            with path.open("rb") as f:
                h.update(f.read(1 << 16))
                f.seek(max(0, size - (1 << 16)))
                h.update(f.read(1 << 16))
    return "local-" + h.hexdigest()[:16]


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def check_weights(folder: Path, allow_pickle: bool) -> None:
    for comp in _COMPONENTS:
        sub = folder / comp
        if not sub.is_dir():
            raise ValueError(
                f"{folder} is not a diffusers Stable Diffusion folder: no {comp}/ subfolder"
            )
        if any(sub.glob("*.safetensors")):
            continue
        pickles = sorted(
            p.name for p in sub.iterdir() if p.suffix in (".bin", ".ckpt", ".pt", ".pth")
        )
        if not pickles:
            raise ValueError(f"{sub} has no weights (.safetensors)")
        if not allow_pickle:
            raise PickleWeightsRefused(
                f"{sub} has only pickle weights ({', '.join(pickles)}); pickle files can run code when "
                "loaded. Convert them to safetensors, or opt in with allow_pickle=True (--allow-pickle)."
            )


def model_folder(
    source: str | os.PathLike[str],
    *,
    revision: str | None = None,
    local_files_only: bool = True,
    allow_pickle: bool = False,
) -> Path:
    """The local folder of a diffusers checkpoint: `source` itself when it is a folder, else the hub
    id's snapshot in the local Hugging Face cache (fetched once unless ``local_files_only``; the
    folder's name is then the resolved commit); see :mod:`editing.model_forms`."""
    from editing.model_forms import hub_snapshot

    path = Path(source)
    if path.is_dir():
        return path.resolve()
    if path.is_file():
        raise ValueError(f"{source} is a file: load it as a single-file checkpoint (load_model)")
    return hub_snapshot(
        str(source), revision, download=not local_files_only, allow_pickle=allow_pickle
    )


def load_model(
    source: str | os.PathLike[str],
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    revision: str | None = None,
    allow_pickle: bool = False,
    local_files_only: bool = True,
    loras: Sequence[str | LoraSpec] = (),
    config: str | os.PathLike[str] | None = None,
) -> EditModel:
    """Load an SD 1.x/2.x diffusers checkpoint (local folder or hub id) for editing.

    Defaults: CUDA + fp16 when available, else CPU + fp32. Hub ids resolve from the local Hugging Face
    cache unless ``local_files_only=False``. Safetensors only unless ``allow_pickle``. The UNet and text
    encoder run in `dtype`; the VAE in :func:`vae_precision` of it (fp32 for an fp16 model whose VAE config
    sets ``force_upcast``), cast here once.

    `source` may also be a single-file checkpoint (``.safetensors``, original SD key layout) configured by
    the local diffusers folder `config`; `loras` (``FILE_OR_ID[@SCALE]``) are fused into the weights for
    this model. The revision records the form: the hub commit, the folder's fingerprint or the file's
    ``sha256-`` hash, then each adapter's hash and scale (:mod:`editing.model_forms`).
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from editing import model_forms as forms

    dev, dt = _default_device_dtype(device, dtype)
    model_id = str(source)
    adapters = forms.resolve_loras(loras, download=not local_files_only, allow_pickle=allow_pickle)
    if forms.is_single_file(source):
        if config is None:
            raise ValueError(
                f"{source} is a single file: give the model family's config folder (config=)"
            )
        folder = model_folder(config)
        vae_dt = vae_precision(dt, _json(folder / "vae" / "config.json"))
        pipe = forms.load_single_file_pipeline(Path(source), folder, dt, vae_dt, allow_pickle)
        rev = "sha256-" + forms.file_sha256(Path(source))[:16]
    else:
        folder = model_folder(
            source, revision=revision, local_files_only=local_files_only, allow_pickle=allow_pickle
        )
        rev = (revision or _local_fingerprint(folder)) if Path(source).is_dir() else folder.name
        check_weights(folder, allow_pickle)
        vae_dt = vae_precision(dt, _json(folder / "vae" / "config.json"))
        pipe = StableDiffusionPipeline.from_pretrained(
            folder,
            dtype={"default": dt, "vae": vae_dt},  # the VAE's precision, chosen once, here
            use_safetensors=None if allow_pickle else True,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
            local_files_only=True,
        )
    forms.apply_loras(pipe, adapters)
    rev += forms.lora_identity(adapters)
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    if (
        pipe.vae.dtype != vae_dt
    ):  # a component folder without a config.json: read the loaded config instead
        vae_dt = vae_precision(dt, pipe.vae.config)
        pipe.vae.to(dtype=vae_dt)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.to(dev)
        module.eval()
        module.requires_grad_(False)
    defaults: dict[str, Any] = {}
    if (folder / "editflow.json").is_file():
        defaults = json.loads((folder / "editflow.json").read_text())
    logger.info("loaded %s (%s) on %s/%s (VAE %s)", model_id, rev, dev, dt, vae_dt)
    return EditModel(
        vae=pipe.vae,
        unet=pipe.unet,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        scheduler=scheduler,
        device=dev,
        dtype=dt,
        model_id=model_id,
        revision=rev,
        defaults=defaults,
        vae_dtype=vae_dt,
    )
