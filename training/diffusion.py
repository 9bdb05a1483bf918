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
    return DDPMScheduler(
        num_train_timesteps=TRAIN_STEPS,
        beta_schedule="squaredcos_cap_v2",
        prediction_type=prediction_type,
        clip_sample=False,
    )


def sampler(prediction_type: str = "sample", clip_sample: bool = False) -> DDIMScheduler:
    """The few-step sampler matching `noise_schedule` (deterministic DDIM, eta 0); images clip x_0 to [-1, 1]."""
    return DDIMScheduler(
        num_train_timesteps=TRAIN_STEPS,
        beta_schedule="squaredcos_cap_v2",
        prediction_type=prediction_type,
        clip_sample=clip_sample,
        set_alpha_to_one=False,
        timestep_spacing="trailing",
    )


def sample_timesteps(batch: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Uniform training timesteps in [0, 1000)."""
    return torch.randint(0, TRAIN_STEPS, (batch,), generator=generator, device=device)


@torch.no_grad()
def ddim_sample(
    denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noise: torch.Tensor,
    steps: int = 64,
    prediction_type: str = "sample",
    clip_sample: bool = False,
    eta: float = 0.0,
    seeds: list[int] | None = None,
) -> torch.Tensor:
    """Run DDIM from `noise` (x_T) with `denoise(x_t, t) -> model output`; returns x_0.

    eta 0 is deterministic DDIM; eta 1 adds fresh noise at every step (ancestral, DDPM-like), which
    forgives a small model's errors. The fresh noise of sample i comes from its own generator
    (seeded from seeds[i]), so a sample does not depend on the batch it was drawn in."""
    scheduler = sampler(prediction_type, clip_sample)
    scheduler.set_timesteps(steps, device=noise.device)
    generators = (
        [torch.Generator().manual_seed(int(s) * 2 + 1) for s in seeds] if eta > 0 and seeds is not None else None
    )
    x = noise
    for t in scheduler.timesteps:
        timestep = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
        variance_noise = None
        if generators is not None:
            variance_noise = torch.stack([torch.randn(x.shape[1:], generator=g) for g in generators]).to(
                x.device, x.dtype
            )
        x = scheduler.step(denoise(x, timestep), t, x, eta=eta, variance_noise=variance_noise).prev_sample
    return x


def seeded_noise(seeds: list[int], shape: tuple[int, ...], candidates: int = 1) -> torch.Tensor:
    """(B·candidates, *shape) Gaussian noise, each sample from its own seed: a sample does not depend
    on the batch it was drawn in, so the same seed gives the same output."""
    rows = []
    for seed in seeds:
        generator = torch.Generator().manual_seed(int(seed))
        rows.append(torch.randn(candidates, *shape, generator=generator))
    return torch.cat(rows)


def guided(model_out_cond: torch.Tensor, model_out_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance on a model output."""
    return model_out_uncond + scale * (model_out_cond - model_out_uncond)
