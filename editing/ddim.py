"""Deterministic DDIM arithmetic on noise *levels*, shared by inversion and every editing method.

Level k = 0..T: level 0 is the clean latent (alpha = the scheduler's final alpha), level k >= 1 is the
latent at the k-th smallest timestep. Denoising goes k -> k-1 evaluating the UNet at level k's timestep;
inversion goes k-1 -> k evaluating it at level k's timestep on the level k-1 latent. The model output is
read through the scheduler's `prediction_type` (epsilon, v_prediction or sample), never hard-coded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Schedule:
    """The T timesteps and T+1 level alphas of one DDIM run."""

    timesteps: torch.Tensor  # (T,) long, timesteps[k-1] = timestep of level k (ascending)
    alphas: torch.Tensor  # (T+1,) float64, alpha_bar of each level; alphas[0] = final alpha
    prediction_type: str
    # alphas as Python floats: the step arithmetic reads these, so no tensor is read back per step
    alpha_values: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if not self.alpha_values:
            object.__setattr__(self, "alpha_values", tuple(self.alphas.double().cpu().tolist()))

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])

    def timestep(self, level: int) -> torch.Tensor:
        return self.timesteps[level - 1]

    def alpha(self, level: int) -> float:
        return self.alpha_values[level]

    def timesteps_on(self, device: torch.device | str) -> torch.Tensor:
        """The (T,) timesteps on `device`, to be made once before a loop and indexed per step there."""
        return self.timesteps.to(device)


def make_schedule(scheduler, num_steps: int) -> Schedule:
    """Level timesteps and alphas of `scheduler` (a DDIMScheduler) for `num_steps` steps."""
    if not isinstance(num_steps, int) or not 1 <= num_steps <= scheduler.config.num_train_timesteps:
        raise ValueError(
            f"num_steps must be an int in [1, {scheduler.config.num_train_timesteps}], got {num_steps!r}"
        )
    scheduler.set_timesteps(num_steps)
    ts = scheduler.timesteps.flip(0).long().cpu()  # ascending
    cum = scheduler.alphas_cumprod.double().cpu()
    final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float64).reshape(1)
    alphas = torch.cat([final, cum[ts]])
    return Schedule(
        timesteps=ts, alphas=alphas, prediction_type=str(scheduler.config.prediction_type)
    )


def math_dtype(t: torch.Tensor) -> torch.dtype:
    """Latent arithmetic runs in fp32 at least (fp16/bf16 models), fp64 for fp64 models (exact tests)."""
    return torch.promote_types(t.dtype, torch.float32)


def split_output(
    out: torch.Tensor, x: torch.Tensor, alpha: float, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, eps) from a model output at latent `x` whose noise level is `alpha` (fp32 or wider math)."""
    dt = torch.promote_types(math_dtype(out), math_dtype(x))
    out, x = out.to(dt), x.to(dt)
    a, s = alpha**0.5, (1.0 - alpha) ** 0.5
    if prediction_type == "epsilon":
        eps = out
        x0 = (x - s * eps) / a
    elif prediction_type == "v_prediction":
        x0 = a * x - s * out
        eps = a * out + s * x
    elif prediction_type == "sample":
        x0 = out
        eps = (x - a * x0) / s
    else:
        raise ValueError(f"unsupported prediction_type {prediction_type!r}")
    return x0, eps


def move(x0: torch.Tensor, eps: torch.Tensor, alpha: float) -> torch.Tensor:
    """The deterministic DDIM latent at level alpha built from (x0, eps)."""
    return alpha**0.5 * x0 + (1.0 - alpha) ** 0.5 * eps


def denoise_step(
    out: torch.Tensor, x: torch.Tensor, schedule: Schedule, level: int
) -> torch.Tensor:
    """One DDIM step level -> level-1 from the (guided) model output at `x`."""
    x0, eps = split_output(out, x, schedule.alpha(level), schedule.prediction_type)
    return move(x0, eps, schedule.alpha(level - 1))


def invert_step(out: torch.Tensor, x: torch.Tensor, schedule: Schedule, level: int) -> torch.Tensor:
    """One DDIM inversion step level-1 -> level; `out` is the model output at (x, timestep of `level`).

    The noise estimate is read at the timestep the UNet was told (level); x0 is then taken at x's own level.
    """
    _, eps = split_output(out, x, schedule.alpha(level), schedule.prediction_type)
    a_prev = schedule.alpha(level - 1)
    x0 = (x.to(eps.dtype) - (1.0 - a_prev) ** 0.5 * eps) / a_prev**0.5
    return move(x0, eps, schedule.alpha(level))


def guide(uncond: torch.Tensor, cond: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Classifier-free guidance; `scale` may be per row (B,) ."""
    dt = math_dtype(cond)
    if isinstance(scale, torch.Tensor):
        scale = scale.to(cond.device, dt).view(-1, *([1] * (cond.dim() - 1)))
    return uncond.to(dt) + scale * (cond.to(dt) - uncond.to(dt))
