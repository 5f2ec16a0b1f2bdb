"""GPU throughput: SD 1.5's architecture with random weights, 512 px, fp16, T = 50, PnP K = 4.

    python -m benchmarks.gpu                 # on a CUDA machine (~5-8 min on an H100, compile included)
    python -m benchmarks.gpu --quick         # fewer sources and iterations, no torch.compile
    python -m benchmarks.gpu --no-compile --sources 4
    python -m benchmarks.gpu --smoke         # developers: the same code paths on CPU with a small config
    python -m benchmarks.gpu --check         # pass/fail check of every engine path, fp16 + bf16 (< 4 min)
    python -m benchmarks.gpu --check --device cpu --tiny   # the same check on CPU with a tiny model

Without a CUDA device it prints "no CUDA device: skipped" and exits 0 (nothing is written).

The model: ``UNet2DConditionModel`` with Stable Diffusion 1.5's configuration written out below
(block_out_channels (320, 640, 1280, 1280), cross_attention_dim 768, attention_head_dim 8,
layers_per_block 2, sample_size 64: the same compute as the real model, ~860M parameters), SD's VAE
configuration and a CLIP ViT-L/14-shaped text encoder (12 layers, width 768), all with random weights
(only the tokenizer's vocabulary is small: the toy caption words). They are put together as an
``editing.model.EditModel`` directly on the GPU in fp16 (``--via-folder`` instead saves a diffusers
folder and loads it through ``editing.load_model``, as the pipeline does). Random weights give the real
compute: the UNet's cost does not depend on its values.

Measured, each in this one run:

1. UNet level: image-evaluations per second at batch 1, 3, 9 (9 = PnP K=4: 1 source + 4 x 2 rows) and
   17 (K=8), and model FLOP utilisation (MFU) against 0.68 TFLOP per image-evaluation (SD 1.5 UNet at
   512 px, forward) and the device's dense fp16 tensor peak (table below, or ``--peak-tflops``);
   toggles: fused attention (diffusers' SDPA processor, the default) vs the classic unfused processor,
   channels-last, and ``torch.compile`` (batch 9).
2. The engine: PnP with K = 4 target prompts per source, T = 50: editflow warm (inversions loaded from
   bytes, one ``edit`` call), editflow cold (the sources inverted together with ``invert_many``, as a
   shard does, then that call), and the naive per-row loop (``invert`` + a one-target ``edit`` per row),
   same sources and prompts: edits per GPU-hour, UNet evaluations per second, UNet rows per call (and per
   inversion call), padding waste, MFU; for each lever on (the others at their defaults): channels-last,
   SDPA off, the VAE decode per chunk, fixed (padded) shapes, and ``torch.compile`` of the controlled UNet
   (editing.model.compile_unet: default, and on CUDA max-autotune and reduce-overhead). The processors
   read the step from a device tensor, so a compiled UNet makes one graph per padded shape and method.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (  # noqa: E402
    machine_facts,
    print_machine,
    print_table,
    smooth_image,
    write_result,
)

TFLOP_PER_EVAL = 0.68  # SD 1.5 UNet forward at 512 px (64x64 latent), one image
# Dense fp16/bf16 tensor-core peaks (TFLOP/s, no sparsity) by device-name substring; first match wins.
PEAK_TFLOPS = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10G", 125.0),
    ("A10", 125.0),
    ("4090", 165.0),
    ("V100", 125.0),
    ("T4", 65.0),
)

# Stable Diffusion 1.5's UNet (runwayml/stable-diffusion-v1-5 unet/config.json), written out.
SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=(
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1.0,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=768,
    attention_head_dim=8,
)
SD15_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)
SD15_TEXT = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    hidden_act="quick_gelu",
    projection_dim=768,
    max_position_embeddings=77,
)
# --smoke: the same block structure, small, for a CPU check of the code paths
SMOKE_UNET = {
    **SD15_UNET,
    "sample_size": 8,
    "block_out_channels": (32, 64, 64, 64),
    "cross_attention_dim": 64,
    "attention_head_dim": 4,
}
SMOKE_VAE = {
    **SD15_VAE,
    "down_block_types": ("DownEncoderBlock2D",) * 2,
    "up_block_types": ("UpDecoderBlock2D",) * 2,
    "block_out_channels": (32, 32),
    "sample_size": 16,
}
SMOKE_TEXT = {
    **SD15_TEXT,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "projection_dim": 64,
}

SOURCE_PROMPTS = (
    "a photo of a cat",
    "a photo of a dog",
    "a red car on gray background",
    "a blue bag on gray background",
)
STYLES = ("in watercolor style", "with a hat", "on a crowded street", "in green")


def peak_tflops(name: str, override: float | None) -> float | None:
    if override:
        return override
    for key, value in PEAK_TFLOPS:
        if key in name:
            return value
    return None


def _random_modules(device, smoke: bool):
    """SD 1.5-shaped (or, with `smoke`, small) UNet, VAE, text encoder, tokenizer and scheduler; random fp32 weights."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from refmodel.tokenizer import write_tokenizer_files
    from refmodel.toy import TOY_WORDS

    tmp = Path(tempfile.mkdtemp(prefix="editflow-gpu-"))
    # SD 1.5 pads every prompt to CLIP's 77 tokens (the cross-attention cost depends on it), whatever
    # length the toy tokenizer files say
    tokenizer = CLIPTokenizer.from_pretrained(
        str(write_tokenizer_files(tmp / "tokenizer", TOY_WORDS)), model_max_length=77
    )
    unet_cfg, vae_cfg, text_cfg = (
        (SMOKE_UNET, SMOKE_VAE, SMOKE_TEXT) if smoke else (SD15_UNET, SD15_VAE, SD15_TEXT)
    )
    torch.manual_seed(0)
    with torch.device(device):  # initialise the weights where they will run (fast on a GPU)
        unet = UNet2DConditionModel(**unet_cfg)
        vae = AutoencoderKL(**vae_cfg)
        text = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                **text_cfg,
            )
        )
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )
    return unet, vae, text, tokenizer, scheduler


def save_model_folder(folder: Path, device, dtype, smoke: bool, out_gain: float = 1.0) -> Path:
    """Write the random-weight model as a diffusers folder (weights in `dtype`), loadable by editing.load_model.

    `out_gain` scales the UNet's output layer (the GPU check uses 0.1: see benchmarks/gpu_check.py).
    """
    import torch
    from diffusers import StableDiffusionPipeline

    unet, vae, text, tokenizer, scheduler = _random_modules(device, smoke)
    if out_gain != 1.0:
        with torch.no_grad():
            unet.conv_out.weight.mul_(out_gain)
            unet.conv_out.bias.mul_(out_gain)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.to(dtype=dtype)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return Path(folder)


def build_model(device, dtype, smoke: bool, via_folder: Path | None):
    """An EditModel of SD 1.5's shape with random weights (or loaded from a saved folder)."""
    import torch

    from editing.model import EditModel, load_model, vae_precision

    if via_folder is not None:
        return load_model(
            save_model_folder(via_folder, device, dtype, smoke), device=device, dtype=dtype
        )
    unet, vae, text, tokenizer, scheduler = _random_modules(device, smoke)
    for m in (unet, vae, text):
        m.eval().requires_grad_(False)
    unet.to(dtype=dtype)
    text.to(dtype=dtype)
    vae_dtype = vae_precision(
        dtype, vae.config
    )  # the engine's one VAE precision rule (fp32 VAE for fp16)
    vae.to(dtype=vae_dtype)
    return EditModel(
        vae=vae,
        unet=unet,
        text_encoder=text,
        tokenizer=tokenizer,
        scheduler=scheduler,
        device=torch.device(device),
        dtype=dtype,
        model_id="random-sd15-shape" if not smoke else "random-smoke",
        revision="random",
        vae_dtype=vae_dtype,
    )


def sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def unet_throughput(model, batch: int, iters: int, warmup: int) -> float:
    """UNet image-evaluations per second at `batch` rows."""
    import torch

    unet = model.unet
    side = unet.config.sample_size
    x = torch.randn(batch, 4, side, side, device=model.device, dtype=model.dtype)
    emb = torch.randn(
        batch, 77, unet.config.cross_attention_dim, device=model.device, dtype=model.dtype
    )
    if unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last):
        x = x.contiguous(memory_format=torch.channels_last)
    t = torch.tensor(500, device=model.device)
    with torch.no_grad():
        for _ in range(warmup):
            unet(x, t, encoder_hidden_states=emb)
        sync(model.device)
        t0 = time.perf_counter()
        for _ in range(iters):
            unet(x, t, encoder_hidden_states=emb)
        sync(model.device)
    return batch * iters / (time.perf_counter() - t0)


class CountingUNet:
    """Stands in for ``model.unet`` and counts each call's rows, outside any compiled graph (hooks on a
    compiled module would run inside it); everything else goes to the UNet itself."""

    def __init__(self, unet) -> None:
        self.unet, self.rows, self.calls = unet, 0, 0

    def __call__(self, sample, *args, **kwargs):
        self.rows += int(sample.shape[0])
        self.calls += 1
        return self.unet(sample, *args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.unet, name)

    def take(self) -> tuple[int, int]:
        """(rows, calls) since the last take."""
        out, self.rows, self.calls = (self.rows, self.calls), 0, 0
        return out


def uncompile_unet(model) -> None:
    """Undo :func:`editing.model.compile_unet` between levers (nn.Module.compile keeps the compiled
    call in ``_compiled_call_impl``; clearing it restores the eager call)."""
    import torch._dynamo

    model.unet._compiled_call_impl = None
    model.compiled = "off"
    torch._dynamo.reset()


def engine_run(
    model, n_sources: int, k: int, steps: int, modes: tuple[str, ...], log, pad: bool | None = None
) -> dict:
    """Edits per hour and UNet evaluations per second of the engine's modes with the model's levers as
    set: naive (one inversion and a one-target edit per row), cold (the sources inverted together, then
    one ``edit`` of all of them, as a shard does) and warm (inversions loaded from bytes, one ``edit``).
    Reports UNet rows per call (and per inversion call), and the padding rows' share (waste). `pad`:
    the engine's fixed batch shapes (None: its default, on when the UNet is compiled)."""
    import torch

    from editing.configs import PnPConfig
    from editing.inversion import Inversion, invert, invert_many
    from editing.methods import SourceGroup, Target, edit

    size = model.native_size
    cfg = PnPConfig()
    sources = []
    for i in range(n_sources):
        prompt = SOURCE_PROMPTS[i % len(SOURCE_PROMPTS)]
        sources.append(
            (
                smooth_image(100 + i, size),
                prompt,
                [Target(f"{prompt} {STYLES[j % len(STYLES)]}", cfg) for j in range(k)],
            )
        )
    images, prompts = [s[0] for s in sources], [s[1] for s in sources]
    real_unet = model.unet
    counter = model.unet = CountingUNet(real_unet)
    waste = [0.0]

    def on_chunk(done) -> None:
        waste[0] += done.padding_evals

    try:
        with torch.no_grad():
            # warm-up (allocations, kernels, compile: every shape the timed runs use), untimed
            t0 = time.perf_counter()
            invs = invert_many(model, images, prompts, num_steps=steps, pad=pad)
            blobs = [inv.to_bytes() for inv in invs]
            edit(model, [SourceGroup(inv, s[2]) for inv, s in zip(invs, sources)], pad=pad)
            if "naive" in modes:
                invert(model, images[0], prompts[0], num_steps=2)
                edit(model, [SourceGroup(invs[0], sources[0][2][:1])])
            sync(model.device)
            warmup_s = time.perf_counter() - t0
            counter.take()
            out = {}
            for mode in modes:
                waste[0] = 0.0
                sync(model.device)
                t0 = time.perf_counter()
                inv_rows = inv_calls = 0
                if mode == "naive":
                    for img, prompt, targets in sources:
                        for t in targets:
                            edit(
                                model,
                                [SourceGroup(invert(model, img, prompt, num_steps=steps), [t])],
                            )
                elif mode == "editflow cold":
                    invs = invert_many(model, images, prompts, num_steps=steps, pad=pad)
                    inv_rows, inv_calls = counter.take()
                    groups = [SourceGroup(inv, s[2]) for inv, s in zip(invs, sources)]
                    edit(model, groups, on_chunk=on_chunk, pad=pad)
                else:
                    groups = [
                        SourceGroup(Inversion.from_bytes(b), s[2]) for b, s in zip(blobs, sources)
                    ]
                    edit(model, groups, on_chunk=on_chunk, pad=pad)
                sync(model.device)
                secs = time.perf_counter() - t0
                rows, calls = counter.take()
                rows, calls = rows + inv_rows, calls + inv_calls
                edits = n_sources * k
                out[mode] = {
                    "seconds": secs,
                    "warmup_s": warmup_s,
                    "edits": edits,
                    "edits_per_gpu_hour": edits / secs * 3600,
                    "seconds_per_edit": secs / edits,
                    "unet_evals": rows,
                    "unet_evals_per_s": rows / secs,
                    "rows_per_call": rows / max(calls, 1),
                    "inversion_rows_per_call": inv_rows / inv_calls if inv_calls else None,
                    "padding_share": waste[0] / max(rows, 1),
                }
                log(f"{mode}: {secs:.1f}s")
    finally:
        model.unet = real_unet
    log(f"untimed warm-up: {warmup_s:.1f}s")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--quick", action="store_true", help="2 sources, fewer iterations, no torch.compile"
    )
    p.add_argument(
        "--sources",
        type=int,
        default=None,
        help="source images per engine run (default 3; 2 with --quick)",
    )
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--steps", type=int, default=None, help="T (default 50)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile toggles")
    p.add_argument(
        "--compile",
        action="store_true",
        help="run the torch.compile toggles even with --quick",
    )
    p.add_argument(
        "--compile-backend",
        default=None,
        help="the engine's torch.compile backend (default: inductor; with --smoke aot_eager: dynamo's "
        "graphs run by eager kernels, since inductor's C++ builds take 15+ minutes on a small CPU)",
    )
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="the device's dense fp16 peak (default: from the device name)",
    )
    p.add_argument(
        "--via-folder",
        action="store_true",
        help="save a diffusers folder and load it with editing.load_model",
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="run on CPU with a small config (a check of the code, not a benchmark)",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="the pass/fail check of every engine path (see benchmarks/gpu_check.py)",
    )
    p.add_argument(
        "--device", default=None, help="--check: cuda (default when available), cuda:N or cpu"
    )
    p.add_argument(
        "--tiny",
        action="store_true",
        help="--check: a tiny model instead of SD 1.5's shape (needed on CPU)",
    )
    p.add_argument(
        "--dtypes",
        default=None,
        help="--check: comma-separated, e.g. float16,bfloat16 (default: those; CPU: float32,bfloat16)",
    )
    args = p.parse_args(argv)

    if args.check:
        from benchmarks.gpu_check import main as check_main

        dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()] if args.dtypes else None
        return check_main(args.device, args.tiny, dtypes, args.steps)

    import torch

    if not torch.cuda.is_available() and not args.smoke:
        print("no CUDA device: skipped")
        return 0
    smoke = args.smoke
    device = "cuda" if torch.cuda.is_available() and not smoke else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    steps = args.steps or (2 if smoke else 50)
    n_sources = args.sources or (1 if smoke else 2 if args.quick else 3)
    iters = 2 if smoke else 10 if args.quick else 30
    warmup = 1 if smoke else 3
    # --smoke compiles too: its figures show compiled vs eager (the graphs, not inductor's kernels)
    do_compile = args.compile or not (args.no_compile or args.quick)
    backend = args.compile_backend or ("aot_eager" if smoke else "inductor")
    facts = machine_facts()
    print_machine(facts)
    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    peak = peak_tflops(name, args.peak_tflops) if device == "cuda" else args.peak_tflops
    log = lambda m: print("  " + m, flush=True)  # noqa: E731
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True

    t_start = time.perf_counter()
    folder = Path(tempfile.mkdtemp(prefix="editflow-gpu-model-")) if args.via_folder else None
    model = build_model(device, dtype, smoke, folder)
    params = sum(p.numel() for p in model.unet.parameters())
    log(
        f"model built in {time.perf_counter() - t_start:.1f}s: UNet {params / 1e6:.0f}M parameters, {model.native_size}px, {dtype}, {name}, peak {peak} TFLOP/s"
    )

    def mfu(evals_per_s: float) -> float | None:
        return evals_per_s * TFLOP_PER_EVAL / peak if peak and not smoke else None

    # 1. UNet level
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    batches = (1, 3) if smoke else (1, 3, 9, 17)
    unet_rows = []
    variants = [
        ("fused SDPA (default)", {}),
        ("unfused attention", {"unfused": True}),
        ("channels_last", {"cl": True}),
    ]
    for label, opt in variants:
        model.unet.set_attn_processor(AttnProcessor() if opt.get("unfused") else AttnProcessor2_0())
        if opt.get("cl"):
            model.unet.to(memory_format=torch.channels_last)
        for b in batches:
            eps = unet_throughput(model, b, iters, warmup)
            unet_rows.append(
                {
                    "variant": label,
                    "batch": b,
                    "evals_per_s": eps,
                    "ms_per_call": b / eps * 1000,
                    "mfu": mfu(eps),
                }
            )
            log(f"UNet {label}, batch {b}: {eps:.1f} evals/s")
        if opt.get("cl"):
            model.unet.to(memory_format=torch.contiguous_format)
    model.unet.set_attn_processor(AttnProcessor2_0())
    compiled_unet = None
    if do_compile:
        b = 9 if not smoke else 3
        try:
            compiled_unet = torch.compile(model.unet, backend=backend)
            plain = model.unet
            model.unet = compiled_unet
            t0 = time.perf_counter()
            eps = unet_throughput(model, b, iters, warmup)
            unet_rows.append(
                {
                    "variant": "torch.compile",
                    "batch": b,
                    "evals_per_s": eps,
                    "ms_per_call": b / eps * 1000,
                    "mfu": mfu(eps),
                    "first_calls_s": time.perf_counter() - t0,
                }
            )
            log(f"UNet torch.compile, batch {b}: {eps:.1f} evals/s")
            model.unet = plain
        except Exception as exc:  # noqa: BLE001 - report, do not fail the whole benchmark
            unet_rows.append(
                {
                    "variant": "torch.compile",
                    "batch": b,
                    "error": f"{type(exc).__name__}: {exc}"[:300],
                }
            )
            log(f"torch.compile failed: {type(exc).__name__}: {exc}")
            compiled_unet = None
    print_table(
        ["UNet variant", "batch", "evals/s", "ms/call", "MFU"],
        [
            [r["variant"], r["batch"], r.get("evals_per_s"), r.get("ms_per_call"), r.get("mfu")]
            for r in unet_rows
        ],
        title=f"UNet level ({name}, {dtype}, {model.native_size}px)",
    )

    # 2. the engine: each lever on (the others at their defaults), warm and cold
    from editing.model import compile_unet, set_channels_last

    engine = {}
    levers: list[tuple[str, dict]] = [
        ("baseline (eager, SDPA, contiguous, decode by 8)", {}),
        ("channels_last", {"cl": True}),
        ("SDPA off (classic attention)", {"sdpa": False}),
        ("VAE decode per chunk", {"decode_batch": 0}),
        ("fixed shapes (padded)", {"pad": True}),
    ]
    if do_compile:
        modes_ = ["default"] + (["max-autotune", "reduce-overhead"] if device == "cuda" else [])
        levers += [(f"compile {m} ({backend})", {"compile": m}) for m in modes_]
    for label, opt in levers:
        t0 = time.perf_counter()
        try:
            set_channels_last(model, bool(opt.get("cl")))
            model.sdpa = opt.get("sdpa", True)
            model.decode_batch = opt.get("decode_batch", 8)
            pad = opt.get("pad")
            if opt.get("compile"):
                # its chunks are padded (fixed shapes)
                compile_unet(model, opt["compile"], backend=backend)
            modes = (
                ("naive", "editflow cold", "editflow warm")
                if not opt
                else ("editflow cold", "editflow warm")
            )
            res = engine_run(model, n_sources, args.k, steps, modes, log, pad=pad)
            for m, d in res.items():
                d["mfu"] = mfu(d["unet_evals_per_s"])
                inv = d["inversion_rows_per_call"]
                log(
                    f"engine {label}, {m}: {d['rows_per_call']:.1f} UNet rows per call"
                    + (f" ({inv:.1f} per inversion call)" if inv else "")
                    + f", padding {d['padding_share']:.0%} of the rows"
                )
            engine[label] = {"modes": res, "wall_s": time.perf_counter() - t0}
        except Exception as exc:  # noqa: BLE001 - report, do not fail the whole benchmark
            engine[label] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            log(f"engine {label} failed: {type(exc).__name__}: {exc}")
        finally:
            uncompile_unet(model)
            set_channels_last(model, False)
            model.sdpa, model.decode_batch = True, 8
    rows = []
    base = next(iter(engine.values()), {}).get("modes", {})
    for label, e in engine.items():
        for m, d in e.get("modes", {}).items():
            ratio = (
                d["edits_per_gpu_hour"] / base["naive"]["edits_per_gpu_hour"]
                if "naive" in base
                else None
            )
            rows.append(
                [
                    label,
                    m,
                    d["edits"],
                    d["seconds_per_edit"],
                    d["edits_per_gpu_hour"],
                    ratio,
                    d["unet_evals"] / d["edits"],
                    d["unet_evals_per_s"],
                    d["rows_per_call"],
                    d["inversion_rows_per_call"],
                    d["padding_share"],
                    d["mfu"],
                ]
            )
        if "error" in e:
            rows.append([label, "error: " + e["error"][:80]] + [None] * 10)
    print_table(
        [
            "lever",
            "mode",
            "edits",
            "s/edit",
            "edits/GPU-hour",
            "x naive",
            "UNet evals/edit",
            "UNet evals/s",
            "rows/call",
            "rows/inversion call",
            "padding",
            "MFU",
        ],
        rows,
        title=f"engine: PnP, K = {args.k}, T = {steps}, {n_sources} sources ({name}, {dtype})",
    )
    print(f"(wall {time.perf_counter() - t_start:.0f}s)")
    if smoke:
        print("smoke run: code paths checked on CPU; nothing written")
        return 0
    write_result(
        "gpu",
        {
            "settings": {
                "device": name,
                "dtype": str(dtype),
                "T": steps,
                "k": args.k,
                "sources": n_sources,
                "iters": iters,
                "peak_tflops": peak,
                "tflop_per_eval": TFLOP_PER_EVAL,
                "unet_params": params,
                "via_folder": args.via_folder,
            },
            "unet": unet_rows,
            "engine": engine,
        },
        facts=facts,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
