"""The noise schedule, the sampler and the random streams, shared by the prior (vectors) and the decoders (images).

Training noise and few-step sampling are diffusers' DDPM / DDIM schedulers with the cosine
schedule. Samplers know one denoiser contract, `denoise(x_t, t) -> model output` (x_0, ε or v), and
classifier-free guidance is `uncond + s · (cond − uncond)` on that output.

Every random draw comes from a stream named by (seed, purpose, indices): numpy's SeedSequence with
the purpose and the indices as its spawn key, so the streams of two purposes, or of two seeds, are
independent by construction rather than by hand-picked offsets (STYLE.md 10).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler

TRAIN_STEPS = 1000
# One stream per purpose, each with a fixed number (its spawn key); a new purpose takes a new number,
# so existing streams, and the samples of existing seeds, never change.
PURPOSES = {
    "train": 0,  # a training step's timesteps, noise and condition dropout: indices (step, rank)
    "validation": 1,  # a validation batch's draws: index (batch)
    "prior_start": 2,  # a prior sample's starting noise x_T (all its candidates; the prior samples with eta 0)
    "decoder_start": 3,  # a decoder sample's starting noise
    "decoder_step": 4,  # the fresh noise of the decoder's sampler at each step (eta > 0): index (row)
    "upsampler_start": 5,
    "upsampler_step": 6,
}


def noise_schedule(prediction_type: str = "sample") -> DDPMScheduler:
    """The training schedule: 1000 steps, cosine (squaredcos_cap_v2), no clipping of x_0."""
    return DDPMScheduler(
        num_train_timesteps=TRAIN_STEPS,
        beta_schedule="squaredcos_cap_v2",
        prediction_type=prediction_type,
        clip_sample=False,
    )


def sampler(prediction_type: str = "sample", clip_sample: bool = False) -> DDIMScheduler:
    """The few-step sampler matching `noise_schedule`; images clip x̂_0 to [-1, 1]."""
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


def stream(seed: int, purpose: str, *indices: int, device: torch.device | str | None = None) -> torch.Generator:
    """The torch generator of (seed, purpose, indices), independent of every other such stream."""
    if int(seed) < 0 or any(int(i) < 0 for i in indices):
        raise ValueError(f"seeds and stream indices are non-negative integers, got {seed} and {indices}")
    sequence = np.random.SeedSequence(int(seed), spawn_key=(PURPOSES[purpose], *map(int, indices)))
    state = int(sequence.generate_state(1, np.uint64)[0])
    return torch.Generator(device if device is not None else "cpu").manual_seed(state)


def seeded_noise(seeds: list[int], shape: tuple[int, ...], purpose: str, candidates: int = 1) -> torch.Tensor:
    """(B·candidates, *shape) Gaussian noise, sample i from the stream (seeds[i], purpose): a sample does
    not depend on the batch it was drawn in, so the same seed gives the same output."""
    rows = [torch.randn(candidates, *shape, generator=stream(seed, purpose)) for seed in seeds]
    return torch.cat(rows)


@torch.no_grad()
def ddim_sample(
    denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noise: torch.Tensor,
    steps: int = 64,
    prediction_type: str = "sample",
    clip_sample: bool = False,
    eta: float = 0.0,
    step_noise: list[torch.Generator] | None = None,
) -> torch.Tensor:
    """Run DDIM from `noise` (x_T) with `denoise(x_t, t) -> model output`; returns the sample at the
    schedule's t = 0 (x̂_0 up to √(1 − ᾱ_0) ≈ 0.006 of noise).

    eta 0 is deterministic DDIM; eta > 0 adds fresh noise at every step (eta 1: ancestral, DDPM-like),
    drawn for row i from its own generator `step_noise[i]`, so a sample does not depend on its batch.
    With `clip_sample`, x̂_0 is clipped to [-1, 1] and ε̂ re-derived from the clipped x̂_0, as GLIDE
    and ADM do (diffusers' `use_clipped_model_output`)."""
    if eta > 0 and (step_noise is None or len(step_noise) != len(noise)):
        raise ValueError("eta > 0 draws fresh noise at every step: pass one generator per row as step_noise")
    scheduler = sampler(prediction_type, clip_sample)
    scheduler.set_timesteps(steps, device=noise.device)
    x = noise
    for t in scheduler.timesteps:
        timestep = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
        fresh = None
        if eta > 0:
            fresh = torch.stack([torch.randn(x.shape[1:], generator=g) for g in step_noise]).to(x.device, x.dtype)
        output = denoise(x, timestep)
        x = scheduler.step(
            output, t, x, eta=eta, use_clipped_model_output=clip_sample, variance_noise=fresh
        ).prev_sample
    return x


def guided(model_out_cond: torch.Tensor, model_out_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance on a model output."""
    return model_out_uncond + scale * (model_out_cond - model_out_uncond)
