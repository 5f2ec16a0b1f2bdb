"""Train the shapes reference model from scratch on CPU, export it, and probe prompt following.

Recipe (all seeded; ``--minutes`` is the total training-time budget, summed over resumes):

1. VAE (``diffusers.AutoencoderKL``, 32x32x3 -> 16x16x4): MSE + 1e-6 KL on freshly rendered
   scenes, AdamW, lr 1e-3 with warm-up and cosine decay over ``--vae-minutes``. Its round-trip
   PSNR on 256 held-out scenes is logged; ``scaling_factor`` is set to 1/std of the latents.
2. UNet + CLIP text encoder jointly, SD's noise schedule (scaled-linear betas, 1000 steps,
   epsilon prediction), min-SNR-5 loss weighting, AdamW lr 6e-4, batch 16, 500 warm-up steps, cosine
   decay to 5% over the remaining budget (by elapsed time, or by ``--unet-steps`` for a
   step-exact schedule), gradient clipping 1.0, EMA 0.999 of both networks (exported).
   Then the VAE decoder alone is fine-tuned for ``decoder_minutes`` on frozen-encoder latents
   (the latent space the UNet learned does not move; the round trip gets sharper).
   Captions drop the colour / background with some probability and are "" 10% of the time
   (classifier-free guidance). Latents come from a buffer that grows by 8 fresh scenes per
   step up to 20,000 (encoding every sample would cost as much as the UNet step).
3. Export (EMA weights, fp32, safetensors) as a ``StableDiffusionPipeline`` with a DDIM
   scheduler, plus ``editflow.json``; then probe: DDIM 50 steps, guidance 7.5, classify the
   generated images' colour / shape / background with the domain scorers.

Prompts are 16 tokens and token embeddings start at std 0.5: with SD's 77 tokens and CLIP's
0.02 init, cross-attention saw nearly the same text for every prompt and ignored it. (The
bundled run1 started with those and was switched mid-run with ``--rescale-text-embeddings 0.5``
at UNet step 2024 and 16-token prompts at step 2603; its checkpoint ``history`` records this.)

Checkpoints (model, optimiser, EMA, RNG states, step, elapsed time) are written atomically to
``OUT/checkpoint.pt`` every few minutes. Resuming restores them; the latent buffer is refilled,
so a resumed run is statistically, not bitwise, identical.

    python -m refmodel.train --out refmodel/checkpoints/run1 --minutes 110
    python -m refmodel.train --out refmodel/checkpoints/run1 --minutes 110 --resume
    python -m refmodel.train --export-from refmodel/checkpoints/run1/checkpoint.pt --to refmodel/shapes-v1
    python -m refmodel.train --probe refmodel/shapes-v2 --probe-n 60
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline

from editing.configs import SD_PNP_ATTN_LAYERS, SD_PNP_FEATURE_LAYERS
from refmodel.domain import (
    BACKGROUNDS,
    COLOURS,
    IMAGE_SIZE,
    SHAPES,
    STYLES,
    TRAIN_STYLE_PROBS,
    Scene,
    caption,
    classify_background,
    classify_colour,
    classify_shape,
    psnr,
    render_array,
    sample_scene,
    segment,
)
from refmodel.models import (
    ModelConfig,
    build_sample_scheduler,
    build_text_encoder,
    build_train_scheduler,
    build_unet,
    build_vae,
)
from refmodel.tokenizer import build_tokenizer, write_tokenizer_files

logger = logging.getLogger("refmodel.train")

MODEL_NAME = "shapes-v2"  # the name the export records in editflow.json

# PnP defaults: editing's SD layers (decoder layer 4's features, self-attention of decoder layers 4-11),
# the attention ones written as the attn1 paths the export records in editflow.json (each of SD's
# attention parents holds one transformer block in this UNet too)
PNP_FEATURE_LAYERS = list(SD_PNP_FEATURE_LAYERS)
PNP_ATTN_LAYERS = [f"{parent}.transformer_blocks.0.attn1" for parent in SD_PNP_ATTN_LAYERS]


@dataclass(frozen=True)
class TrainConfig:
    """Training hyper-parameters (defaults are the recipe in the module docstring)."""

    seed: int = 0  # seeds numpy (scenes, captions) and torch (init, noise, timesteps)
    minutes: float = 110.0  # total training budget in minutes, VAE + UNet, across resumes
    vae_minutes: float = 12.0  # part of the budget for the VAE
    vae_batch: int = 16  # images per VAE step
    vae_lr: float = 1e-3  # peak AdamW lr for the VAE
    vae_kl_weight: float = 1e-6  # tiny: keeps latents bounded, reconstruction dominates
    vae_target_psnr: float = 45.0  # dB; stop the VAE phase early once reached
    unet_batch: int = 16  # latents per UNet step; small: more updates per CPU-second
    unet_lr: float = 6e-4  # peak AdamW lr; small nets trained briefly like a high lr
    unet_warmup: int = 500  # steps of linear warm-up
    unet_steps: int = 0  # if > 0, a step-exact cosine schedule of this length; else by time
    min_lr_ratio: float = 0.05  # cosine floor as a fraction of the peak lr
    weight_decay: float = 0.01  # AdamW weight decay
    ema_decay: float = 0.999  # EMA of UNet + text encoder weights (~1000-step horizon)
    snr_gamma: float = 5.0  # min-SNR loss weighting (Hang et al. 2023); 0 disables
    # Offset noise (Guttenberg 2023): noise + offset * N(0, 1) per (sample, channel). SD's schedule
    # leaves the latent's mean in x_T at inference, so without it a model cannot follow "black" /
    # "white" backgrounds (it generates mid-gray); 0 disables.
    offset_noise: float = 0.1
    uncond_prob: float = 0.1  # caption -> "" for classifier-free guidance
    drop_probs: tuple[float, float, float, float] = (0.6, 0.13, 0.13, 0.14)  # full/-col/-bg/-both
    buffer_start: int = 1024  # latents encoded before the first UNet step
    buffer_max: int = 20_000  # latent buffer capacity
    buffer_refresh: int = 8  # fresh scenes encoded per UNet step
    checkpoint_minutes: float = 5.0  # how often to write OUT/checkpoint.pt
    probe_minutes: float = 20.0  # how often to log a quick prompt-following probe
    decoder_minutes: float = 10.0  # VAE decoder fine-tune (encoder frozen) after the UNet
    decoder_lr: float = 5e-4  # peak AdamW lr of the decoder fine-tune
    reserve_minutes: float = 3.0  # budget kept for the final export and probe
    threads: int = 2  # torch intra-op threads (the machine is shared)

    def __post_init__(self) -> None:
        if self.vae_minutes >= self.minutes:
            raise ValueError(f"vae_minutes={self.vae_minutes} must be < minutes={self.minutes}")
        if abs(sum(self.drop_probs) - 1.0) > 1e-6:
            raise ValueError(f"drop_probs must sum to 1, got {self.drop_probs}")


DROPS = (
    frozenset(),
    frozenset({"colour"}),
    frozenset({"background"}),
    frozenset({"colour", "background"}),
)


# ----------------------------------------------------------------------------- data


def scene_batch(rng: np.random.Generator, n: int) -> tuple[torch.Tensor, list[Scene]]:
    """Render n random scenes, styles included: ((n, 3, 32, 32) float in [-1, 1], scenes)."""
    scenes = [sample_scene(rng, TRAIN_STYLE_PROBS) for _ in range(n)]
    images = np.stack([render_array(s)[0] for s in scenes])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x, scenes


class CaptionIds:
    """Token ids of captions, cached (the caption set is small)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.cache: dict[str, torch.Tensor] = {}

    def __call__(self, texts: list[str]) -> torch.Tensor:
        missing = [t for t in dict.fromkeys(texts) if t not in self.cache]
        if missing:
            ids = self.tokenizer(
                missing,
                padding="max_length",
                max_length=self.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            self.cache.update(zip(missing, ids, strict=True))
        return torch.stack([self.cache[t] for t in texts])


def training_caption(scene: Scene, rng: np.random.Generator, cfg: TrainConfig) -> str:
    """Caption for training: "" with uncond_prob, else a full or partial caption."""
    if rng.random() < cfg.uncond_prob:
        return ""
    return caption(scene, DROPS[int(rng.choice(4, p=cfg.drop_probs))])


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: Path, state: dict) -> None:
    """torch.save to a temporary file, then rename over `path` (atomic on POSIX)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".ckpt-", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def lr_factor(progress: float, step: int, warmup: int, floor: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine from 1 to `floor` as progress goes 0->1."""
    warm = min(1.0, (step + 1) / max(1, warmup))
    progress = min(max(progress, 0.0), 1.0)
    return warm * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


# ----------------------------------------------------------------------------- VAE phase


@torch.no_grad()
def vae_psnr(vae, n: int = 256, seed: int = 12345) -> float:
    """Mean round-trip PSNR (dB, uint8 images) of the VAE on n held-out scenes (posterior mean)."""
    vae.eval()
    rng = np.random.default_rng(seed)
    values = []
    for start in range(0, n, 64):
        x, _ = scene_batch(rng, min(64, n - start))
        recon = vae.decode(vae.encode(x).latent_dist.mean).sample
        a = ((x + 1) * 127.5).round().clamp(0, 255).permute(0, 2, 3, 1).numpy()
        b = ((recon + 1) * 127.5).round().clamp(0, 255).permute(0, 2, 3, 1).numpy()
        values += [min(psnr(u, v), 99.0) for u, v in zip(a, b, strict=True)]
    vae.train()
    return float(np.mean(values))


@torch.no_grad()
def latent_std(vae, n: int = 2048, seed: int = 54321) -> float:
    """Standard deviation of the VAE posterior means over n scenes."""
    rng = np.random.default_rng(seed)
    latents = [vae.encode(scene_batch(rng, 128)[0]).latent_dist.mean for _ in range(n // 128)]
    return float(torch.cat(latents).std())


def train_vae(state: dict, cfg: TrainConfig, out: Path, clock: Clock) -> None:
    """Phase 1: train the VAE until its budget is spent or the PSNR target is reached."""
    vae = state["vae_model"]
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    if state.get("vae_opt") is not None:
        opt.load_state_dict(state["vae_opt"])
    rng = state["np_rng"]
    budget = cfg.vae_minutes * 60
    step = state.get("vae_step", 0)
    step0, t_start = step, clock.phase_elapsed("vae")
    last_log = last_ckpt = time.time()
    vae.train()
    while True:
        elapsed = clock.phase_elapsed("vae")
        if elapsed >= budget:
            break
        for g in opt.param_groups:
            g["lr"] = cfg.vae_lr * lr_factor(elapsed / budget, step, 100, cfg.min_lr_ratio)
        x, _ = scene_batch(rng, cfg.vae_batch)
        dist = vae.encode(x).latent_dist
        recon = vae.decode(dist.sample(generator=state["torch_gen"])).sample
        mse = F.mse_loss(recon, x)
        loss = mse + cfg.vae_kl_weight * dist.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        now = time.time()
        if now - last_log > 60 or step == 20:
            p = vae_psnr(vae, 128)
            print(
                f"[vae] step {step} mse {mse.item():.5f} psnr {p:.2f} dB "
                f"{(elapsed - t_start) / max(step - step0, 1):.3f} s/step "
                f"elapsed {elapsed / 60:.1f} min",
                flush=True,
            )
            last_log = now
            if p >= cfg.vae_target_psnr:
                print(f"[vae] reached {p:.2f} dB >= target, stopping early", flush=True)
                break
        if now - last_ckpt > cfg.checkpoint_minutes * 60:
            state.update(vae_step=step, vae_opt=opt.state_dict())
            save_checkpoint(out / "checkpoint.pt", pack_state(state, clock))
            last_ckpt = now
    state["vae_step"] = step
    state["vae_psnr"] = vae_psnr(vae, 256)
    std = latent_std(vae)
    vae.register_to_config(scaling_factor=1.0 / std)
    state["phase"] = "unet"
    state["vae_opt"] = None
    print(
        f"[vae] done: {step} steps, round-trip PSNR {state['vae_psnr']:.2f} dB, "
        f"latent std {std:.4f} -> scaling_factor {1.0 / std:.4f}",
        flush=True,
    )
    save_checkpoint(out / "checkpoint.pt", pack_state(state, clock))
    shutil.copyfile(out / "checkpoint.pt", out / "vae_done.pt")


# ----------------------------------------------------------------------------- UNet phase


class LatentBuffer:
    """Ring buffer of (scaled latent, scene) pairs, refreshed with a few fresh scenes per step."""

    def __init__(self, vae, capacity: int, latent_shape: tuple[int, int, int]) -> None:
        self.vae = vae
        self.capacity = capacity
        self.latents = torch.empty((capacity, *latent_shape))  # (capacity, 4, 16, 16)
        self.scenes: list[Scene] = []
        self.cursor = 0  # next slot to overwrite once full

    @torch.no_grad()
    def add(self, rng: np.random.Generator, n: int) -> None:
        for start in range(0, n, 128):
            x, scenes = scene_batch(rng, min(128, n - start))
            z = self.vae.encode(x).latent_dist.mean * self.vae.config.scaling_factor
            for zi, s in zip(z, scenes, strict=True):
                if len(self.scenes) < self.capacity:
                    self.latents[len(self.scenes)] = zi
                    self.scenes.append(s)
                else:
                    self.latents[self.cursor] = zi
                    self.scenes[self.cursor] = s
                    self.cursor = (self.cursor + 1) % self.capacity

    def sample(self, rng: np.random.Generator, n: int) -> tuple[torch.Tensor, list[Scene]]:
        idx = rng.integers(len(self.scenes), size=n)
        return self.latents[torch.from_numpy(idx)], [self.scenes[i] for i in idx]


def snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """min(SNR, gamma) / SNR per sample (epsilon prediction); ones when gamma <= 0."""
    if gamma <= 0:
        return torch.ones(len(timesteps))
    alphas = scheduler.alphas_cumprod[timesteps]
    snr = alphas / (1 - alphas)
    return torch.clamp(snr, max=gamma) / snr


def train_unet(state: dict, cfg: TrainConfig, out: Path, clock: Clock) -> None:
    """Phase 2: train UNet + text encoder jointly on buffered latents, with EMA."""
    vae, unet, text = state["vae_model"], state["unet_model"], state["text_model"]
    vae.eval().requires_grad_(False)
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=cfg.weight_decay)
    if state.get("unet_opt") is not None:
        opt.load_state_dict(state["unet_opt"])
        for p in params:  # moments of truncated parameters (position embeddings) follow them
            for name, value in opt.state.get(p, {}).items():
                if torch.is_tensor(value) and value.dim() == p.dim() and value.shape != p.shape:
                    opt.state[p][name] = value[tuple(slice(0, n) for n in p.shape)].clone()
    ema_params = list(state["ema_unet"].parameters()) + list(state["ema_text"].parameters())
    scheduler = build_train_scheduler()
    ids_of = CaptionIds(state["tokenizer"])
    rng, gen = state["np_rng"], state["torch_gen"]
    mcfg = state["model_config"]
    latent_shape = (mcfg.latent_channels, mcfg.latent_size, mcfg.latent_size)
    buffer = LatentBuffer(vae, cfg.buffer_max, latent_shape)
    buffer.add(rng, cfg.buffer_start)
    reserve = min(cfg.reserve_minutes, 0.1 * cfg.minutes)
    budget = (cfg.minutes - cfg.vae_minutes - cfg.decoder_minutes - reserve) * 60
    step = state.get("unet_step", 0)
    step0, t_start = step, clock.phase_elapsed("unet")
    last_log = last_ckpt = last_probe = time.time()
    losses: list[float] = []
    unet.train()
    text.train()
    while True:
        elapsed = clock.phase_elapsed("unet")
        if cfg.unet_steps > 0:
            if step >= cfg.unet_steps:
                break
            progress = step / cfg.unet_steps
        else:
            progress = elapsed / budget
        if elapsed >= budget:
            break
        for g in opt.param_groups:
            g["lr"] = cfg.unet_lr * lr_factor(progress, step, cfg.unet_warmup, cfg.min_lr_ratio)
        buffer.add(rng, cfg.buffer_refresh)
        latents, scenes = buffer.sample(rng, cfg.unet_batch)
        ids = ids_of([training_caption(s, rng, cfg) for s in scenes])
        noise = torch.randn(latents.shape, generator=gen)
        if cfg.offset_noise > 0:
            noise = noise + cfg.offset_noise * torch.randn(
                (*latents.shape[:2], 1, 1), generator=gen
            )
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),), generator=gen)
        noisy = scheduler.add_noise(latents, noise, t)
        hidden = text(ids)[0]  # (B, 77, text_hidden)
        pred = unet(noisy, t, hidden).sample  # (B, 4, 16, 16)
        per_sample = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
        loss = (per_sample * snr_weights(scheduler, t, cfg.snr_gamma)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        k = step - state.get("ema_since", 0)  # steps since the EMA was (re)started
        decay = min(cfg.ema_decay, (1 + k) / (10 + k))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - decay)
        losses.append(per_sample.mean().item())
        now = time.time()
        if now - last_log > 60 or step == step0 + 20:
            rate = (elapsed - t_start) / max(step - step0, 1)
            print(
                f"[unet] step {step} loss {np.mean(losses):.4f} lr {opt.param_groups[0]['lr']:.2e} "
                f"{rate:.3f} s/step ({1 / rate:.2f} it/s) progress {progress:.3f} "
                f"elapsed {elapsed / 60:.1f} min buffer {len(buffer.scenes)}",
                flush=True,
            )
            losses.clear()
            last_log = now
        if now - last_ckpt > cfg.checkpoint_minutes * 60:
            state.update(unet_step=step, unet_opt=opt.state_dict())
            save_checkpoint(out / "checkpoint.pt", pack_state(state, clock))
            last_ckpt = now
        if now - last_probe > cfg.probe_minutes * 60:
            pipe = make_pipeline(vae, state["ema_text"], state["tokenizer"], state["ema_unet"])
            acc = probe(pipe, n=30, steps=25)
            print(f"[probe] step {step} (EMA, 30 samples, 25 DDIM steps): {acc}", flush=True)
            last_probe = time.time()
    state.update(unet_step=step, unet_opt=opt.state_dict(), phase="decoder")
    save_checkpoint(out / "checkpoint.pt", pack_state(state, clock))
    print(f"[unet] done: {step} steps", flush=True)


def train_decoder(state: dict, cfg: TrainConfig, out: Path, clock: Clock) -> None:
    """Phase 3: fine-tune the VAE decoder on frozen-encoder latents (the UNet's latent space
    does not move, so this only sharpens the round trip)."""
    vae = state["vae_model"]
    vae.requires_grad_(False)
    vae.decoder.requires_grad_(True)
    if vae.post_quant_conv is not None:
        vae.post_quant_conv.requires_grad_(True)
    params = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.decoder_lr, weight_decay=0.0)
    rng = state["np_rng"]
    budget = cfg.decoder_minutes * 60
    step, last_log = 0, time.time()
    print(f"[decoder] start: round-trip PSNR {vae_psnr(vae, 256):.2f} dB", flush=True)
    vae.train()
    while (elapsed := clock.phase_elapsed("decoder")) < budget:
        for g in opt.param_groups:
            g["lr"] = cfg.decoder_lr * lr_factor(elapsed / budget, step, 50, cfg.min_lr_ratio)
        x, _ = scene_batch(rng, cfg.vae_batch)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mean
        mse = F.mse_loss(vae.decode(z).sample, x)
        opt.zero_grad(set_to_none=True)
        mse.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        if time.time() - last_log > 60:
            print(
                f"[decoder] step {step} mse {mse.item():.5f} psnr {vae_psnr(vae, 128):.2f} dB",
                flush=True,
            )
            last_log = time.time()
    vae.requires_grad_(False)
    state["vae_psnr"] = vae_psnr(vae, 256)
    state["phase"] = "done"
    print(f"[decoder] done: {step} steps, round-trip PSNR {state['vae_psnr']:.2f} dB", flush=True)
    save_checkpoint(out / "checkpoint.pt", pack_state(state, clock))


# ----------------------------------------------------------------------------- state


class Clock:
    """Training time per phase, carried across resumes."""

    def __init__(self, elapsed: dict[str, float] | None = None) -> None:
        self.before = dict(elapsed or {})
        self.phase: str | None = None
        self.started = 0.0

    def start(self, phase: str) -> None:
        if self.phase is not None:  # bank the time of the phase that ends
            self.before[self.phase] = self.phase_elapsed(self.phase)
        self.phase, self.started = phase, time.time()

    def phase_elapsed(self, phase: str) -> float:
        extra = time.time() - self.started if phase == self.phase else 0.0
        return self.before.get(phase, 0.0) + extra

    def snapshot(self) -> dict[str, float]:
        phases = set(self.before) | ({self.phase} if self.phase else set())
        return {p: self.phase_elapsed(p) for p in phases}


def pack_state(state: dict, clock: Clock) -> dict:
    """The serialisable part of the training state."""
    return {
        "phase": state["phase"],
        "train_config": dataclasses.asdict(state["train_config"]),
        "model_config": dataclasses.asdict(state["model_config"]),
        "vae_config": dict(state["vae_model"].config),
        "vae": state["vae_model"].state_dict(),
        "unet": state["unet_model"].state_dict(),
        "text": state["text_model"].state_dict(),
        "ema_unet": state["ema_unet"].state_dict(),
        "ema_text": state["ema_text"].state_dict(),
        "vae_opt": state.get("vae_opt"),
        "unet_opt": state.get("unet_opt"),
        "vae_step": state.get("vae_step", 0),
        "unet_step": state.get("unet_step", 0),
        "ema_since": state.get("ema_since", 0),
        "history": state.get("history", []),
        "vae_psnr": state.get("vae_psnr"),
        "np_rng": state["np_rng"].bit_generator.state,
        "torch_gen": state["torch_gen"].get_state(),
        "torch_rng": torch.get_rng_state(),
        "elapsed": clock.snapshot(),
    }


def new_state(cfg: TrainConfig, mcfg: ModelConfig, tokenizer_dir: Path) -> dict:
    """Freshly initialised models and RNGs."""
    torch.manual_seed(cfg.seed)
    tokenizer = build_tokenizer(tokenizer_dir)
    unet = build_unet(mcfg)
    text = build_text_encoder(mcfg, tokenizer)
    gen = torch.Generator().manual_seed(cfg.seed)
    return {
        "phase": "vae",
        "train_config": cfg,
        "model_config": mcfg,
        "tokenizer": tokenizer,
        "vae_model": build_vae(mcfg),
        "unet_model": unet,
        "text_model": text,
        "ema_unet": copy.deepcopy(unet).requires_grad_(False),
        "ema_text": copy.deepcopy(text).requires_grad_(False),
        "np_rng": np.random.default_rng(cfg.seed),
        "torch_gen": gen,
    }


def init_from_export(state: dict, folder: Path) -> None:
    """Warm start: load the VAE, UNet and text encoder of an exported pipeline into `state`.

    Token embeddings are matched by token string, so a grown vocabulary (new caption words)
    keeps every known token's embedding; new tokens keep their fresh init. Both EMAs restart
    from the loaded weights. The architecture (ModelConfig) must be the export's.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    vae = AutoencoderKL.from_pretrained(str(folder / "vae"))
    unet = UNet2DConditionModel.from_pretrained(str(folder / "unet"))
    text = CLIPTextModel.from_pretrained(str(folder / "text_encoder"))
    old_vocab = json.loads((folder / "tokenizer" / "vocab.json").read_text())
    state["vae_model"].load_state_dict(vae.state_dict())
    state["vae_model"].register_to_config(scaling_factor=vae.config.scaling_factor)
    state["unet_model"].load_state_dict(unet.state_dict())
    new_vocab = state["tokenizer"].get_vocab()
    weights = text.state_dict()
    emb_key = next(k for k in weights if k.endswith("token_embedding.weight"))
    old_emb = weights.pop(emb_key)
    target = state["text_model"]
    missing, unexpected = target.load_state_dict(weights, strict=False)
    if unexpected or set(missing) != {emb_key}:
        raise ValueError(f"text encoder mismatch: missing {missing}, unexpected {unexpected}")
    new_emb = target.get_input_embeddings().weight
    kept = 0
    with torch.no_grad():
        for token, new_id in new_vocab.items():
            if token in old_vocab:
                new_emb[new_id] = old_emb[old_vocab[token]]
                kept += 1
    state["ema_unet"].load_state_dict(state["unet_model"].state_dict())
    state["ema_text"].load_state_dict(target.state_dict())
    state.setdefault("history", []).append(
        f"warm start from {folder.name} ({kept} of {len(new_vocab)} token embeddings kept)"
    )
    print(state["history"][-1], flush=True)


def load_state(path: Path, tokenizer_dir: Path) -> tuple[dict, Clock]:
    """Rebuild the models and RNGs from a checkpoint file."""
    ck = torch.load(path, map_location="cpu", weights_only=False)
    mcfg = ModelConfig(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in ck["model_config"].items()}
    )
    saved = {"offset_noise": 0.0, **ck["train_config"]}  # runs before offset noise had none
    tcfg = TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})
    state = new_state(tcfg, mcfg, tokenizer_dir)
    n_pos = state["tokenizer"].model_max_length
    truncated = False
    for key in ("text", "ema_text"):  # older checkpoints had 77 positions: keep the first n_pos
        for name, value in list(ck[key].items()):
            if name.endswith("position_embedding.weight") and value.shape[0] > n_pos:
                ck[key][name] = value[:n_pos]
                truncated = True
            elif name.endswith("position_ids") and value.shape[-1] > n_pos:
                ck[key][name] = value[..., :n_pos]
    state["vae_model"].register_to_config(scaling_factor=ck["vae_config"]["scaling_factor"])
    for key in ("vae", "unet", "text", "ema_unet", "ema_text"):
        target = state[key if key.startswith("ema") else f"{key}_model"]
        target.load_state_dict(ck[key])
    state["np_rng"].bit_generator.state = ck["np_rng"]
    state["torch_gen"].set_state(ck["torch_gen"])
    torch.set_rng_state(ck["torch_rng"])
    for key in ("phase", "vae_opt", "unet_opt", "vae_step", "unet_step", "vae_psnr"):
        state[key] = ck[key]
    state["ema_since"] = ck.get("ema_since", 0)
    state["history"] = list(ck.get("history", []))
    if truncated:
        state["history"].append(
            f"unet step {ck['unet_step']}: prompts shortened to {n_pos} tokens (was 77)"
        )

    return state, Clock(ck["elapsed"])


# ----------------------------------------------------------------------------- export / probe


def make_pipeline(vae, text, tokenizer, unet) -> StableDiffusionPipeline:
    """Assemble an SD pipeline (DDIM scheduler, no safety checker) from the parts."""
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=build_sample_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def editflow_facts(extra: dict | None = None) -> dict:
    """Contents of editflow.json: the domain and the default editing-layer facts."""
    facts = {
        "name": MODEL_NAME,
        "native_resolution": IMAGE_SIZE,
        "latent_shape": [4, IMAGE_SIZE // 2, IMAGE_SIZE // 2],
        "domain": {
            "description": "one coloured object on a flat background, 32x32 RGB, plain or styled",
            "shapes": list(SHAPES),
            "styles": [st for st in STYLES if st != "plain"],
            "colours": {k: list(v) for k, v in COLOURS.items()},
            "backgrounds": {k: list(v) for k, v in BACKGROUNDS.items()},
            "caption_template": "a {colour} {shape} on a {background} background",
            "styled_caption_template": "a {colour} {shape} on a {background} background, {style}",
            "partial_captions": [
                "a {shape} on a {background} background",
                "a {colour} {shape}",
                "a {shape}",
            ],
            "two_token_words": {"turquoise": ["turqu", "oise</w>"]},
        },
        "pnp_feature_layers": PNP_FEATURE_LAYERS,
        "pnp_attn_layers": PNP_ATTN_LAYERS,
        "cross_attention_map_resolutions": [16, 8, 4],
        # P2P local blend reads the 8x8 cross-attention maps (1/4 of the 16x16 latent's positions):
        # the objects are 5-10 latent cells wide, too small for SD's 1/16 (4x4 here)
        "p2p_blend_fraction": 0.25,
        "defaults": {"num_inference_steps": 50, "guidance_scale": 7.5},
    }
    facts.update(extra or {})
    return facts


def export_checkpoint(checkpoint: Path, to: Path, use_ema: bool = True) -> Path:
    """Export a training checkpoint as a safetensors StableDiffusionPipeline folder."""
    with tempfile.TemporaryDirectory() as tmp:
        state, _ = load_state(checkpoint, Path(tmp) / "tokenizer")
        unet = state["ema_unet"] if use_ema else state["unet_model"]
        text = state["ema_text"] if use_ema else state["text_model"]
        pipe = make_pipeline(state["vae_model"], text, state["tokenizer"], unet)
        if to.exists():
            shutil.rmtree(to)
        pipe.save_pretrained(str(to), safe_serialization=True)
    # vocab.json + merges.txt too, so slow-tokenizer loaders (transformers 4.x) work as well
    write_tokenizer_files(to / "tokenizer")
    facts = editflow_facts(
        {
            "trained_from_checkpoint": {
                "phase": state["phase"],
                "unet_steps": state.get("unet_step", 0),
                "vae_steps": state.get("vae_step", 0),
                "vae_round_trip_psnr_db": state.get("vae_psnr"),
                "weights": "ema" if use_ema else "raw",
                "history": state.get("history", []),
            }
        }
    )
    (to / "editflow.json").write_text(json.dumps(facts, indent=2) + "\n")
    return to


@torch.no_grad()
def probe(
    pipe: StableDiffusionPipeline,
    n: int = 60,
    steps: int = 50,
    guidance: float = 7.5,
    seed: int = 7,
    batch: int = 30,
) -> dict[str, float]:
    """Prompt-following accuracy on n full captions of random scenes (domain scorers)."""
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng) for _ in range(n)]
    hits = {"colour": 0, "shape": 0, "background": 0, "all": 0}
    gen = torch.Generator().manual_seed(seed)
    for start in range(0, n, batch):
        chunk = scenes[start : start + batch]
        images = pipe(
            [caption(s) for s in chunk],
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=gen,
            output_type="np",
        ).images
        for s, img in zip(chunk, images, strict=True):
            arr = (img * 255).round().clip(0, 255).astype(np.uint8)
            mask = segment(arr)
            ok = {
                "colour": classify_colour(arr, mask) == s.colour,
                "shape": classify_shape(mask) == s.shape,
                "background": classify_background(arr) == s.background,
            }
            ok["all"] = all(ok.values())
            for k, v in ok.items():
                hits[k] += int(v)
    return {k: round(v / n, 3) for k, v in hits.items()}


# ----------------------------------------------------------------------------- CLI


def rescale_text_embeddings(state: dict, target_std: float) -> None:
    """Rescale the text encoder's token embeddings to `target_std` and restart both EMAs.

    With CLIP's init (std 0.02, same as the position embeddings) the text states of different
    prompts hardly differ, so cross-attention gets almost no signal; larger token embeddings
    make each token's identity dominate its hidden state.
    """
    weight = state["text_model"].get_input_embeddings().weight
    with torch.no_grad():
        old = float(weight.std())
        weight.mul_(target_std / old)
        state["ema_text"].load_state_dict(state["text_model"].state_dict())
        state["ema_unet"].load_state_dict(state["unet_model"].state_dict())
    step = state.get("unet_step", 0)
    state["ema_since"] = step
    state.setdefault("history", []).append(
        f"unet step {step}: token embeddings rescaled from std {old:.4f} to {target_std}; EMA restarted"
    )
    print(state["history"][-1], flush=True)


def train(
    out: Path,
    cfg: TrainConfig,
    resume: bool,
    text_embedding_std: float | None = None,
    extra_unet_minutes: float = 0.0,
    init_from: Path | None = None,
    offset_noise: float | None = None,
) -> None:
    """Run (or resume) the whole recipe, then export to OUT/export and probe it."""
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "checkpoint.pt"
    tok_dir = out / "tokenizer"
    if resume and ckpt.exists():
        state, clock = load_state(ckpt, tok_dir)
        if text_embedding_std is not None:
            rescale_text_embeddings(state, text_embedding_std)
        if offset_noise is not None and offset_noise != state["train_config"].offset_noise:
            state["train_config"] = dataclasses.replace(
                state["train_config"], offset_noise=offset_noise
            )
            state.setdefault("history", []).append(
                f"unet step {state.get('unet_step', 0)}: offset noise {offset_noise} from here on"
            )
            print(state["history"][-1], flush=True)
        if extra_unet_minutes > 0:
            old = state["train_config"]
            state["train_config"] = dataclasses.replace(
                old, minutes=old.minutes + extra_unet_minutes
            )
            if state["phase"] in ("decoder", "done"):
                state["phase"] = "unet"
            state.setdefault("history", []).append(
                f"unet step {state.get('unet_step', 0)}: budget extended by {extra_unet_minutes} min"
            )
            print(state["history"][-1], flush=True)
        print(f"resumed from {ckpt}: phase {state['phase']} elapsed {clock.snapshot()}", flush=True)
    else:
        if ckpt.exists() and not resume:
            raise ValueError(f"{ckpt} exists; pass --resume or choose another --out")
        state, clock = new_state(cfg, ModelConfig(), tok_dir), Clock()
        if init_from is not None:
            init_from_export(state, init_from)
    n_unet = sum(p.numel() for p in state["unet_model"].parameters())
    n_vae = sum(p.numel() for p in state["vae_model"].parameters())
    n_text = sum(p.numel() for p in state["text_model"].parameters())
    print(
        f"params: unet {n_unet / 1e6:.2f}M vae {n_vae / 1e6:.2f}M text {n_text / 1e6:.2f}M",
        flush=True,
    )
    print(f"config: {state['train_config']}\nmodel: {state['model_config']}", flush=True)
    cfg = state["train_config"]
    if state["phase"] == "vae":
        clock.start("vae")
        train_vae(state, cfg, out, clock)
    if state["phase"] == "unet":
        clock.start("unet")
        train_unet(state, cfg, out, clock)
    if state["phase"] == "decoder":
        clock.start("decoder")
        train_decoder(state, cfg, out, clock)
    clock.start("export")
    export_dir = export_checkpoint(ckpt, out / "export")
    print(f"exported to {export_dir}", flush=True)
    pipe = StableDiffusionPipeline.from_pretrained(str(export_dir))
    pipe.set_progress_bar_config(disable=True)
    print(
        f"[probe] final (EMA, 60 samples, 50 DDIM steps, cfg 7.5): {probe(pipe, n=60)}", flush=True
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, help="run folder (checkpoint.pt, log, export/)")
    parser.add_argument("--minutes", type=float, default=TrainConfig.minutes)
    parser.add_argument("--vae-minutes", type=float, default=TrainConfig.vae_minutes)
    parser.add_argument("--decoder-minutes", type=float, default=TrainConfig.decoder_minutes)
    parser.add_argument("--unet-steps", type=int, default=0, help="step-exact schedule length")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument(
        "--rescale-text-embeddings",
        type=float,
        default=None,
        help="on --resume: rescale token embeddings to this std and restart the EMAs",
    )
    parser.add_argument(
        "--extra-unet-minutes",
        type=float,
        default=0.0,
        help="on --resume: add this much UNet training (also after a finished run)",
    )
    parser.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="warm start a fresh run from an exported model folder (e.g. refmodel/shapes-v1)",
    )
    parser.add_argument(
        "--offset-noise",
        type=float,
        default=None,
        help=f"offset-noise strength (default {TrainConfig.offset_noise}); on --resume, changes it",
    )
    parser.add_argument("--vae-lr", type=float, default=TrainConfig.vae_lr)
    parser.add_argument("--unet-lr", type=float, default=TrainConfig.unet_lr)
    parser.add_argument("--unet-warmup", type=int, default=TrainConfig.unet_warmup)
    parser.add_argument(
        "--threads", type=int, default=TrainConfig.threads, help="torch intra-op threads"
    )
    parser.add_argument("--export-from", type=Path, help="checkpoint.pt to export")
    parser.add_argument("--to", type=Path, help="export folder (with --export-from)")
    parser.add_argument("--raw", action="store_true", help="export raw instead of EMA weights")
    parser.add_argument("--probe", type=Path, help="exported pipeline folder to probe")
    parser.add_argument("--probe-n", type=int, default=60)
    parser.add_argument("--probe-steps", type=int, default=50)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    if args.export_from is not None:
        if args.to is None:
            parser.error("--export-from needs --to")
        print(f"exported to {export_checkpoint(args.export_from, args.to, use_ema=not args.raw)}")
        return
    if args.probe is not None:
        pipe = StableDiffusionPipeline.from_pretrained(str(args.probe))
        pipe.set_progress_bar_config(disable=True)
        print(probe(pipe, n=args.probe_n, steps=args.probe_steps))
        return
    if args.out is None:
        parser.error("--out is required for training")
    cfg = TrainConfig(
        seed=args.seed,
        minutes=args.minutes,
        vae_minutes=args.vae_minutes,
        decoder_minutes=args.decoder_minutes,
        unet_steps=args.unet_steps,
        vae_lr=args.vae_lr,
        unet_lr=args.unet_lr,
        unet_warmup=args.unet_warmup,
        threads=args.threads,
        offset_noise=TrainConfig.offset_noise if args.offset_noise is None else args.offset_noise,
    )
    train(
        args.out,
        cfg,
        args.resume,
        args.rescale_text_embeddings,
        args.extra_unet_minutes,
        init_from=args.init_from,
        offset_noise=args.offset_noise,
    )


if __name__ == "__main__":
    main()
