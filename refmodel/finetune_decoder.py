"""Fine-tune only the VAE decoder of an exported reference model, keeping its latent space fixed.

    python -m refmodel.finetune_decoder --model refmodel/shapes-v1 --minutes 10

The encoder (and so every latent the UNet was trained on) stays frozen; the decoder alone learns to map
the encoder's posterior means back to the procedural images more exactly. The UNet needs no retraining,
and the VAE round trip (which bounds every reconstruction and background PSNR) improves. Seeded, prints
progress, writes the decoder back into the folder (safetensors) when the held-out PSNR improved.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from refmodel import REFERENCE_MODEL_DIR
from refmodel.train import scene_batch


@torch.no_grad()
def heldout_psnr(vae, images: torch.Tensor) -> float:
    rec = vae.decode(vae.encode(images).latent_dist.mean).sample.clamp(-1, 1)
    mse = float(((rec - images) / 2).pow(2).mean())
    return 10 * float(np.log10(1 / mse))


def finetune(
    folder: Path, minutes: float, *, batch: int = 32, lr: float = 3e-4, seed: int = 0
) -> tuple[float, float]:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    vae = AutoencoderKL.from_pretrained(folder / "vae")
    vae.requires_grad_(False)
    params = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    for p in params:
        p.requires_grad_(True)
    held, _ = scene_batch(np.random.default_rng(999), 256)
    before = heldout_psnr(vae, held)
    print(f"held-out round-trip PSNR before: {before:.2f} dB", flush=True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    deadline = time.monotonic() + minutes * 60
    step, last = 0, time.monotonic()
    while time.monotonic() < deadline:
        images, _ = scene_batch(rng, batch)
        with torch.no_grad():
            z = vae.encode(images).latent_dist.mean
        rec = vae.decode(z).sample
        loss = (rec - images).pow(2).mean() + 0.1 * (rec - images).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if time.monotonic() - last > 60:
            last = time.monotonic()
            for g in opt.param_groups:  # halve the rate every minute: a short, settling schedule
                g["lr"] *= 0.7
            print(
                f"step {step} loss {loss.item():.5f} held-out PSNR {heldout_psnr(vae, held):.2f} dB",
                flush=True,
            )
    after = heldout_psnr(vae, held)
    print(f"held-out round-trip PSNR after {step} steps: {after:.2f} dB", flush=True)
    if after > before:
        vae.requires_grad_(False)
        vae.save_pretrained(folder / "vae", safe_serialization=True)
        print(f"saved the fine-tuned decoder to {folder / 'vae'}")
    return before, after


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=REFERENCE_MODEL_DIR)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    finetune(args.model, args.minutes)


if __name__ == "__main__":
    main()
