"""The noise schedule and the sampler, shared by the prior (vectors) and the decoder (images).

Training noise and few-step sampling are diffusers' DDPM / DDIM schedulers with the cosine
schedule. Samplers know one denoiser contract, `model(x_t, t, cond) -> x_0` (or ε for the
decoder), and classifier-free guidance is `uncond + s · (cond − uncond)` on that output.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import DDIMScheduler, DDPMScheduler

TRAIN_STEPS = 1000


def noise_schedule(prediction_type: str = "sample") -> DDPMScheduler:
    """The training schedule: 1000 steps, cosine (squaredcos_cap_v2), no clipping of x_0."""
    return DDPMScheduler(num_train_timesteps=TRAIN_STEPS, beta_schedule="squaredcos_cap_v2",
                         prediction_type=prediction_type, clip_sample=False)  # fmt: skip


def sampler(prediction_type: str = "sample") -> DDIMScheduler:
    """The few-step sampler matching `noise_schedule` (deterministic DDIM, eta 0)."""
    return DDIMScheduler(num_train_timesteps=TRAIN_STEPS, beta_schedule="squaredcos_cap_v2", prediction_type=prediction_type,
                         clip_sample=False, set_alpha_to_one=False, timestep_spacing="trailing")  # fmt: skip


def sample_timesteps(batch: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Uniform training timesteps in [0, 1000)."""
    return torch.randint(0, TRAIN_STEPS, (batch,), generator=generator, device=device)


@torch.no_grad()
def ddim_sample(denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], noise: torch.Tensor, steps: int = 64,
                prediction_type: str = "sample") -> torch.Tensor:  # fmt: skip
    """Run DDIM from `noise` (x_T) with `denoise(x_t, t) -> model output`; returns x_0."""
    scheduler = sampler(prediction_type)
    scheduler.set_timesteps(steps, device=noise.device)
    x = noise
    for t in scheduler.timesteps:
        timestep = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
        x = scheduler.step(denoise(x, timestep), t, x).prev_sample
    return x


def guided(model_out_cond: torch.Tensor, model_out_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance on a model output."""
    return model_out_uncond + scale * (model_out_cond - model_out_uncond)
