"""Is caching PnP features worth it? Bytes per source image, fetch time, and the compute it replaces.

    python -m benchmarks.feature_cache            # TINY and BENCH toy models, T = 50 (~4-6 min on a busy CPU)
    python -m benchmarks.feature_cache --quick    # T = 20, fewer repeats

With cached features (the pipeline's ``--cache-features``) a warm PnP edit runs no source row: the
source's injected tensors (conv2 output of the feature layers, attn1 queries and keys of the attention
layers, fp16, conditional source row only) are read from the cache instead. This script measures, on
the TINY and BENCH toy models (refmodel.toy, CPU fp32, one torch thread):

1. bytes per source image: ``len(PnPFeatures.to_bytes())`` of features recorded by a live edit
   (``edit(..., record_features=True)``), checked against the arithmetic below applied to the toy's
   config;
2. fetch time: ``store.get(key)`` + ``PnPFeatures.from_bytes`` from a local folder (``LocalStore``; the
   file is in the page cache, so this is the best case of a local disk) and from S3 (``S3Store`` on a
   moto server started here, on localhost in this process: no network latency, but the server's
   work shares this process);
3. the compute it replaces: (a) T UNet evaluations of one row alone, and (b) the marginal cost of the
   source row in the engine's batch of 1 + 2K rows: T x (time of a 1+2K-row UNet call - time of a
   2K-row call), interleaved and repeated (minimum of each: the least disturbed by other processes),
   for K = 1, 4, 8, beside the row's average share of the batch; plus the engine's own live vs
   replayed edit at K = 1 (injection machinery included).

The cache pays where fetch time < replaced compute. SD 1.5 at 512 px by arithmetic (T = 50, PnP
defaults; values per source image, fp16 = 2 bytes each, conditional source row only):

- residual features: up_blocks.1.resnets.1 conv2 output, 1280 ch x 16x16 = 327,680 values per step,
  for int(0.8 x 50) = 40 steps: 13,107,200 values;
- self-attention q and k (attn1) at decoder layers 4-11, for int(0.5 x 50) = 25 steps:
  up_blocks.1 attentions 1, 2 (16x16 = 256 positions x 1280): 2 layers x 2 x 327,680 = 1,310,720;
  up_blocks.2 attentions 0, 1, 2 (32x32 = 1024 x 640): 3 x 2 x 655,360 = 3,932,160;
  up_blocks.3 attentions 0, 1, 2 (64x64 = 4096 x 320): 3 x 2 x 1,310,720 = 7,864,320;
  per step 13,107,200; x 25 steps = 327,680,000 values;
- total 340,787,200 values x 2 bytes = 681,574,400 bytes (~682 MB, 650 MiB) per source image.
The compute it replaces on a GPU is T = 50 evaluations of one row at 0.68 TFLOP each = 34 TFLOP; at
an assumed sustained R TFLOP/s that is 34 / R seconds (R is not measured here: ``benchmarks/gpu.py``
measures it). Break-even read bandwidth = bytes / that time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (  # noqa: E402
    build_toy,
    machine_facts,
    make_bucket,
    moto_s3,
    print_machine,
    print_table,
    setup_torch,
    smooth_image,
    write_result,
)

KS = (1, 4, 8)
SD15_TFLOP_PER_EVAL = 0.68
ASSUMED_GPU_TFLOPS = (
    100.0,
    300.0,
)  # sustained fp16 rates to translate 34 TFLOP into seconds (assumptions)

# SD 1.5 at 512 px, PnP defaults (see the docstring): (layer, what, positions, channels, tensors, steps)
SD15_T = 50
SD15_FEATURE_STEPS = int(0.8 * SD15_T)  # 40
SD15_ATTN_STEPS = int(0.5 * SD15_T)  # 25
SD15_LAYERS = [
    ("up_blocks.1.resnets.1 conv2", "conv2", 16 * 16, 1280, 1, SD15_FEATURE_STEPS),
    ("up_blocks.1.attentions.1 attn1", "q,k", 16 * 16, 1280, 2, SD15_ATTN_STEPS),
    ("up_blocks.1.attentions.2 attn1", "q,k", 16 * 16, 1280, 2, SD15_ATTN_STEPS),
    ("up_blocks.2.attentions.0 attn1", "q,k", 32 * 32, 640, 2, SD15_ATTN_STEPS),
    ("up_blocks.2.attentions.1 attn1", "q,k", 32 * 32, 640, 2, SD15_ATTN_STEPS),
    ("up_blocks.2.attentions.2 attn1", "q,k", 32 * 32, 640, 2, SD15_ATTN_STEPS),
    ("up_blocks.3.attentions.0 attn1", "q,k", 64 * 64, 320, 2, SD15_ATTN_STEPS),
    ("up_blocks.3.attentions.1 attn1", "q,k", 64 * 64, 320, 2, SD15_ATTN_STEPS),
    ("up_blocks.3.attentions.2 attn1", "q,k", 64 * 64, 320, 2, SD15_ATTN_STEPS),
]
FP16_BYTES = 2


def sd15_bytes() -> dict:
    per_layer = [(name, pos * ch * n * steps) for name, _, pos, ch, n, steps in SD15_LAYERS]
    values = sum(v for _, v in per_layer)
    return {"values": values, "bytes": values * FP16_BYTES, "per_layer_values": dict(per_layer)}


def expected_values(
    unet_config, latent_hw: int, steps: int, feature_layers, attn_layers, feature_t=0.8, attn_t=0.5
) -> int:
    """The same arithmetic for any SD-shaped UNet: up_blocks[i] runs at latent / 2^(levels-1-i) with
    reversed(block_out_channels)[i] channels; attn1's q and k have as many channels as the block."""
    rev = list(reversed(unet_config.block_out_channels))
    levels = len(rev)

    def block(path: str) -> tuple[int, int]:
        i = int(path.split(".")[1])
        side = latent_hw // 2 ** (levels - 1 - i)
        return side * side, rev[i]

    total = 0
    for path in feature_layers:
        pos, ch = block(path)
        total += pos * ch * int(feature_t * steps)
    for path in attn_layers:
        pos, ch = block(path)
        total += 2 * pos * ch * int(attn_t * steps)
    return total


def _median_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_model(
    spec: str, folder: Path, steps: int, reps: int, endpoint: str, tmp: Path, log
) -> dict:
    import torch

    from editing.configs import PnPConfig
    from editing.ddim import make_schedule
    from editing.inversion import invert
    from editing.methods import PnPFeatures, SourceGroup, Target, edit
    from editing.model import load_model
    from editing.pnp import pnp_layers
    from storage.local import LocalStore
    from storage.uri import open_store

    model = load_model(folder, device="cpu", dtype=torch.float32)
    cfg = PnPConfig()
    image = smooth_image(3, model.native_size)
    prompt = "a photo of a cat"
    inv = invert(model, image, prompt, num_steps=steps)
    targets = [
        Target(f"a photo of a cat {w}", cfg)
        for w in (
            "in watercolor style",
            "with a hat",
            "in green",
            "small",
            "in blue",
            "on a crowded street",
            "big",
            "in red",
        )
    ]
    with torch.no_grad():
        live = edit(model, [SourceGroup(inv, targets[:1])], record_features=True)[0][0]
    feats = live.features
    blob = feats.to_bytes()
    kinds: dict[str, int] = {}
    for key, t in feats.tensors.items():
        kind = key.split("@")[0].rsplit(".", 1)[1]
        kinds[kind] = kinds.get(kind, 0) + t.numel() * t.element_size()
    flayers, alayers = pnp_layers(model, cfg)
    latent_hw = inv.latents.shape[-1]
    exp_values = expected_values(
        model.unet.config, latent_hw, steps, flayers, alayers, cfg.feature_t, cfg.attn_t
    )
    log(
        f"{spec}: {len(blob):,} bytes of features per source ({feats.nbytes:,} of tensors; arithmetic: {exp_values * FP16_BYTES:,})"
    )

    # fetch: local folder and S3 (moto)
    fetch = {}
    local = LocalStore(str(tmp / f"cache-{spec}"))
    s3 = open_store(f"s3://editflow-bench/cache-{spec}", s3_endpoint=endpoint)
    for name, store in (("local", local), ("s3 (moto)", s3)):
        store.put("features.safetensors", blob)

        def get(store=store):
            return PnPFeatures.from_bytes(store.get("features.safetensors"))

        get()
        fetch[name] = _median_time(get, max(reps, 5))
        log(
            f"{spec}: fetch from {name}: {fetch[name] * 1000:.1f} ms ({len(blob) / fetch[name] / 1e9:.2f} GB/s)"
        )

    # compute replaced: UNet-level, one row alone and the marginal row in a batch of 1 + 2K
    schedule = make_schedule(model.scheduler, steps)
    z = inv.latents[steps][None]
    emb_src = inv.cond[None].to(model.dtype)
    emb_t = model.encode_prompts(["", targets[0].prompt])
    tstep = schedule.timestep(steps // 2)
    with torch.no_grad():

        def call(rows: int, with_source: bool):
            x = z.expand(rows, -1, -1, -1).to(model.dtype)
            n_t = rows - int(with_source)
            e = emb_t.repeat(n_t // 2, 1, 1)
            if with_source:
                e = torch.cat([emb_src, e])
            return model.unet(x, tstep, encoder_hidden_states=e).sample

        call(1, True)
        one_row = min(_median_time(lambda: call(1, True), 1) for _ in range(reps * 3))
        marginal, share = {}, {}
        for k in KS:
            a, b = [], []
            for _ in range(
                reps * 3
            ):  # interleaved; the minimum is the least disturbed by other processes
                t0 = time.perf_counter()
                call(1 + 2 * k, True)
                a.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                call(2 * k, False)
                b.append(time.perf_counter() - t0)
            marginal[k] = max(0.0, min(a) - min(b)) * steps
            share[k] = (
                min(a) / (1 + 2 * k) * steps
            )  # the row's average share of the batch, for comparison
            log(
                f"{spec}: source row's marginal cost at K={k}: {marginal[k] * 1000:.0f} ms per edit call ({steps} steps; "
                f"average row share {share[k] * 1000:.0f} ms)"
            )
    # the engine's live vs replayed edit at K = 1 (injection machinery included)
    with torch.no_grad():
        group_live = [SourceGroup(inv, targets[:1])]
        group_replay = [SourceGroup(inv, targets[:1], features=PnPFeatures.from_bytes(blob))]
        lt, rt = [], []
        for _ in range(max(1, reps // 2)):
            t0 = time.perf_counter()
            edit(model, group_live)
            lt.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            edit(model, group_replay)
            rt.append(time.perf_counter() - t0)
    engine_saving = statistics.median(lt) - statistics.median(rt)
    log(
        f"{spec}: engine K=1: live {statistics.median(lt):.2f}s, replay {statistics.median(rt):.2f}s, saving {engine_saving * 1000:.0f} ms"
    )
    return {
        "spec": spec,
        "unet_params": sum(p.numel() for p in model.unet.parameters()),
        "latent": latent_hw,
        "T": steps,
        "bytes": len(blob),
        "tensor_bytes": feats.nbytes,
        "bytes_by_kind": kinds,
        "arithmetic_bytes": exp_values * FP16_BYTES,
        "tensors": len(feats.tensors),
        "fetch_s": fetch,
        "one_row_T_evals_s": one_row * steps,
        "marginal_source_row_s": marginal,
        "average_row_share_s": share,
        "engine_k1_live_s": statistics.median(lt),
        "engine_k1_replay_s": statistics.median(rt),
        "engine_k1_saving_s": engine_saving,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="T = 20 and fewer repeats")
    p.add_argument("--steps", type=int, default=None, help="T (default 50; 20 with --quick)")
    p.add_argument(
        "--specs", default="TINY,BENCH", help="toy specs to measure (default TINY,BENCH)"
    )
    args = p.parse_args(argv)
    steps = args.steps or (20 if args.quick else 50)
    reps = 3 if args.quick else 5
    setup_torch()
    facts = machine_facts()
    print_machine(facts)
    t_start = time.perf_counter()
    log = lambda m: print("  " + m, flush=True)  # noqa: E731
    measured = []
    with tempfile.TemporaryDirectory(prefix="editflow-bench-") as tmp_s:
        tmp = Path(tmp_s)
        with moto_s3(tmp) as endpoint:
            make_bucket(endpoint, "editflow-bench")
            for spec in args.specs.split(","):
                folder = build_toy(tmp / spec.lower(), spec)
                measured.append(measure_model(spec, folder, steps, reps, endpoint, tmp, log))

    print_table(
        [
            "model",
            "UNet params",
            "latent",
            "T",
            "bytes/source",
            "arithmetic",
            "conv2 bytes",
            "q+k bytes",
            "fetch local ms",
            "fetch S3 (moto) ms",
            "T evals of 1 row ms",
        ],
        [
            [
                m["spec"],
                m["unet_params"],
                m["latent"],
                m["T"],
                m["bytes"],
                m["arithmetic_bytes"],
                m["bytes_by_kind"].get("conv2", 0),
                m["bytes_by_kind"].get("q", 0) + m["bytes_by_kind"].get("k", 0),
                m["fetch_s"]["local"] * 1000,
                m["fetch_s"]["s3 (moto)"] * 1000,
                m["one_row_T_evals_s"] * 1000,
            ]
            for m in measured
        ],
        title="cached PnP features per source image (toy models, CPU)",
    )
    verdict_rows = []
    verdicts = []
    for m in measured:
        for storage, f in m["fetch_s"].items():
            for k in KS:
                saved = m["marginal_source_row_s"][k]
                pays = f < saved
                verdict_rows.append(
                    [
                        m["spec"],
                        storage,
                        k,
                        f * 1000,
                        saved * 1000,
                        m["average_row_share_s"][k] * 1000,
                        (saved - f) * 1000,
                        pays,
                    ]
                )
                verdicts.append(
                    {
                        "model": m["spec"],
                        "storage": storage,
                        "k": k,
                        "fetch_ms": f * 1000,
                        "saved_ms": saved * 1000,
                        "pays": pays,
                    }
                )
        verdict_rows.append(
            [
                m["spec"],
                "(engine, K=1, live - replay)",
                1,
                None,
                m["engine_k1_saving_s"] * 1000,
                None,
                None,
                None,
            ]
        )
    print_table(
        [
            "model",
            "storage",
            "K",
            "fetch ms",
            "source-row compute saved ms",
            "avg row share ms",
            "net gain ms per source",
            "cache pays",
        ],
        verdict_rows,
        title="does the feature cache pay? (per source image and edit call; saved = the source row's marginal cost in a batch of 1+2K)",
    )

    sd = sd15_bytes()
    sd_rows = [
        [name, what, pos, ch, n, st, pos * ch * n * st, pos * ch * n * st * FP16_BYTES]
        for name, what, pos, ch, n, st in SD15_LAYERS
    ]
    sd_rows.append(["total", "", None, None, None, None, sd["values"], sd["bytes"]])
    print_table(
        ["layer", "tensors", "positions", "channels", "count", "steps", "values", "bytes (fp16)"],
        sd_rows,
        title="SD 1.5, 512 px, T = 50, PnP defaults: cached features per source image (arithmetic)",
    )
    seconds_sd = {r: SD15_T * SD15_TFLOP_PER_EVAL / r for r in ASSUMED_GPU_TFLOPS}
    local_bw = {m["spec"]: m["bytes"] / m["fetch_s"]["local"] for m in measured}
    s3_bw = {m["spec"]: m["bytes"] / m["fetch_s"]["s3 (moto)"] for m in measured}
    best_local = max(local_bw.values())
    best_s3 = max(s3_bw.values())
    sd_lines = []
    for r, s in seconds_sd.items():
        need = sd["bytes"] / s
        sd_lines.append(
            {
                "assumed_tflops": r,
                "source_branch_s": s,
                "breakeven_GBps": need / 1e9,
                "fetch_local_s_at_measured_bw": sd["bytes"] / best_local,
                "fetch_s3_moto_s_at_measured_bw": sd["bytes"] / best_s3,
            }
        )
    print_table(
        [
            "assumed GPU TFLOP/s",
            "source branch s (50 x 0.68 TFLOP)",
            "break-even GB/s",
            "fetch local s (measured GB/s)",
            "fetch S3-moto s (measured GB/s)",
        ],
        [
            [
                d["assumed_tflops"],
                d["source_branch_s"],
                d["breakeven_GBps"],
                d["fetch_local_s_at_measured_bw"],
                d["fetch_s3_moto_s_at_measured_bw"],
            ]
            for d in sd_lines
        ],
        title=f"SD 1.5: {sd['bytes'] / 1e6:.0f} MB per source vs the source branch it replaces (upper bound: the row alone)",
    )
    print(
        f"measured read throughput: local {best_local / 1e9:.2f} GB/s (page cache), S3 via moto on localhost {best_s3 / 1e9:.2f} GB/s"
    )

    pays_any = sorted({(v["model"], v["storage"], v["k"]) for v in verdicts if v["pays"]})
    summary_lines = []
    for m in measured:
        for storage in m["fetch_s"]:
            ks = [
                v["k"]
                for v in verdicts
                if v["model"] == m["spec"] and v["storage"] == storage and v["pays"]
            ]
            summary_lines.append(
                f"{m['spec']}, {storage}: pays at K in {ks}"
                if ks
                else f"{m['spec']}, {storage}: does not pay at any K"
            )
    print("\n" + "\n".join(summary_lines))
    print(
        f"SD 1.5 (arithmetic): {sd['bytes'] / 1e6:.0f} MB per source image; to beat recomputing the source row "
        f"(~{seconds_sd[ASSUMED_GPU_TFLOPS[0]]:.2f}-{seconds_sd[ASSUMED_GPU_TFLOPS[-1]]:.2f} s at {ASSUMED_GPU_TFLOPS[0]:.0f}-{ASSUMED_GPU_TFLOPS[-1]:.0f} TFLOP/s), "
        f"a fetch must sustain {min(d['breakeven_GBps'] for d in sd_lines):.1f}-{max(d['breakeven_GBps'] for d in sd_lines):.1f} GB/s per GPU; "
        f"and in a batch of 1+2K rows the source row costs less than alone, so the bar is higher still."
    )
    print("=> keep --cache-features off by default (RunOptions.cache_features = False)")
    print(
        f"(wall {time.perf_counter() - t_start:.0f}s; noisy: other processes share this machine's cores)"
    )
    write_result(
        "feature_cache",
        {
            "settings": {
                "T": steps,
                "ks": list(KS),
                "reps": reps,
                "device": "cpu",
                "dtype": "float32 (features stored fp16)",
                "s3": "moto ThreadedMotoServer on localhost, same process",
            },
            "toy_models": measured,
            "verdicts": verdicts,
            "pays": [list(x) for x in pays_any],
            "sd15": {
                **sd,
                "T": SD15_T,
                "tflop_per_eval": SD15_TFLOP_PER_EVAL,
                "per_assumed_rate": sd_lines,
            },
            "measured_bandwidth_Bps": {"local": best_local, "s3_moto": best_s3},
            "recommendation": "cache_features off by default",
        },
        facts=facts,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
