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

import math

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, UnCLIPScheduler

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


def v_weight(schedule: DDPMScheduler, t: torch.Tensor, cap: float, prediction_type: str) -> torch.Tensor:
    """Per-row weights (B,) that make an MSE on ε or x_0 the v objective's (Salimans & Ho 2022), capped at `cap`:
    ‖v − v̂‖² = ‖ε − ε̂‖²/ᾱ_t = ‖x_0 − x̂_0‖²/(1 − ᾱ_t). v's weights put the high-noise steps, which settle an
    image's layout and colours, and the low-noise ones, which settle its detail, on one footing; the cap is needed
    because an ε network near t = T (or an x_0 network near t = 0) cannot be made exact and the weight there grows
    without bound."""
    abar = schedule.alphas_cumprod.to(t.device)[t].double()
    weight = 1 / abar if prediction_type == "epsilon" else 1 / (1 - abar)
    return weight.clamp(max=cap).float()


def predicted_x0(
    schedule: DDPMScheduler, prediction: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """x̂_0 from a network's ε or x_0 ('sample') prediction at x_t, t."""
    if prediction_type == "sample":
        return prediction
    abar = _at(schedule.alphas_cumprod.double(), t, x_t)
    return ((x_t - (1 - abar).sqrt() * prediction) / abar.sqrt()).to(prediction.dtype)


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
    steps: int,
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


# Learned variance (Nichol & Dhariwal 2021, "Improved DDPM"; Karlo's decoder): the network outputs, beside ε,
# values v in [-1, 1] that interpolate the reverse step's log variance between the posterior's β̃_t and β_t;
# they are trained by the variational bound's term at t (the "hybrid" loss L_simple + λ·L_vlb, with λ·T = 1
# for T = 1000 steps), through which ε receives no gradient.


def _at(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[t] per row, shaped to broadcast over `like` (B, ...)."""
    return values.to(like.device, torch.float64)[t].float().view(-1, *([1] * (like.dim() - 1)))


def _schedule_terms(schedule: DDPMScheduler) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ᾱ_t, ᾱ_{t-1}, β_t) of every step, in float64."""
    abar = schedule.alphas_cumprod.double()
    return abar, torch.cat([abar.new_ones(1), abar[:-1]]), schedule.betas.double()


def posterior_log_variance(schedule: DDPMScheduler, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """log β̃_t of q(x_{t-1} | x_t, x_0), clipped: log β̃_1 stands in at t = 0, where β̃_0 = 0."""
    abar, abar_prev, betas = _schedule_terms(schedule)
    variance = betas * (1 - abar_prev) / (1 - abar)
    return _at(torch.log(torch.cat([variance[1:2], variance[1:]])), t, like)


def posterior(schedule: DDPMScheduler, x_0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
    """Mean and clipped log variance of q(x_{t-1} | x_t, x_0)."""
    abar, abar_prev, betas = _schedule_terms(schedule)
    coef_0 = betas * abar_prev.sqrt() / (1 - abar)
    coef_t = (1 - abar_prev) * (1 - betas).sqrt() / (1 - abar)
    mean = _at(coef_0, t, x_t) * x_0 + _at(coef_t, t, x_t) * x_t
    return mean, posterior_log_variance(schedule, t, x_t)


def model_log_variance(schedule: DDPMScheduler, values: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The reverse step's log variance from the network's values v ∈ [-1, 1]: between log β̃_t and log β_t."""
    min_log = posterior_log_variance(schedule, t, values)
    max_log = _at(torch.log(schedule.betas.double()), t, values)
    frac = (values + 1) / 2
    return frac * max_log + (1 - frac) * min_log


def _normal_kl(mean_1, log_var_1, mean_2, log_var_2) -> torch.Tensor:
    return 0.5 * (
        -1.0 + log_var_2 - log_var_1 + torch.exp(log_var_1 - log_var_2) + (mean_1 - mean_2) ** 2 * torch.exp(-log_var_2)
    )


def _discretised_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log p(x) of 8-bit images in [-1, 1] under a Gaussian discretised to their 256 levels (Ho et al. 2020)."""
    centred = x - mean
    inv_std = torch.exp(-log_scale)
    cdf = lambda v: 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v**3)))  # noqa: E731
    cdf_plus, cdf_min = cdf(inv_std * (centred + 1 / 255)), cdf(inv_std * (centred - 1 / 255))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def vlb_term(
    schedule: DDPMScheduler,
    x_0_hat: torch.Tensor,
    values: torch.Tensor,
    x_0: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
) -> torch.Tensor:
    """The variational bound's term at t per row, in bits per dimension: KL(q(x_{t-1}|x_t,x_0) ‖ p(x_{t-1}|x_t))
    for t > 0, the discretised decoder NLL of x_0 at t = 0. The model's mean is built from its x̂_0 detached, so
    the prediction gets no gradient from it (Improved DDPM); whether its gradient reaches the network the values
    share with the prediction is the decoder's choice (training/decoder.py, `bound_trains_network`)."""
    model_mean, _ = posterior(schedule, x_0_hat.detach(), x_t, t)
    true_mean, true_log_var = posterior(schedule, x_0, x_t, t)
    log_var = model_log_variance(schedule, values, t)
    dims = tuple(range(1, x_0.dim()))
    kl = _normal_kl(true_mean, true_log_var, model_mean, log_var).mean(dims) / math.log(2.0)
    nll = -_discretised_log_likelihood(x_0, model_mean, 0.5 * log_var).mean(dims) / math.log(2.0)
    return torch.where(t == 0, nll, kl)


def variance_range_penalty(values: torch.Tensor) -> torch.Tensor:
    """Per row, the mean squared excess of the variance values beyond [-1, 1]. UnCLIPScheduler interpolates the log
    variance with them and clamps nothing, and the variational bound does not keep them in range: where the mean is
    still poor (an x_0 network near t = 0) it asks for more variance than β_t, and since the values barely depend
    on t, the drift reaches the high-noise steps, which the bound leaves untrained (β_t ≈ β̃_t there, single-step)
    but a strided sampler does not (measured: values ~2, up to 12, after 800 steps of the demo's x_0 decoder,
    whose 40-step samples came out speckled on grey backgrounds; the same net with its values clamped drew every
    background right). A soft pull, not a clamp: trained with it, the demo's values sit near 0.8, up to ~2."""
    excess = (values.float().abs() - 1).clamp(min=0)
    return excess.pow(2).mean(dim=tuple(range(1, values.dim())))


UNCLIP_PREDICTIONS = ("epsilon", "sample")  # what UnCLIPScheduler samples: ε or x_0, not v


def unclip_scheduler(variance_type: str, prediction_type: str, clip_sample: bool = True) -> UnCLIPScheduler:
    """diffusers' UnCLIPScheduler on our training schedule (1000 steps, squaredcos_cap_v2): how Karlo's stages
    sample, and the scheduler configs make export-diffusers writes. `variance_type`: 'learned_range' (a model
    that predicts its variance) or 'fixed_small_log'; `prediction_type`: 'epsilon' or 'sample' (x_0)."""
    return UnCLIPScheduler(
        num_train_timesteps=TRAIN_STEPS,
        beta_schedule="squaredcos_cap_v2",
        variance_type=variance_type,
        prediction_type=prediction_type,
        clip_sample=clip_sample,
    )


def unclip_sample(
    denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noise: torch.Tensor,
    steps: int,
    generators: list[torch.Generator],
    prediction_type: str,
) -> torch.Tensor:
    """Ancestral sampling of a model that predicts ε (or x_0: 'sample') and its variance (6 channels), as Karlo
    samples its decoder (diffusers' UnCLIPScheduler: steps spread over [999, 0], the learned variance, x̂_0 clipped
    to [-1, 1]); row i's fresh noise comes from generators[i], so a sample does not depend on its batch."""
    scheduler = unclip_scheduler("learned_range", prediction_type)
    scheduler.set_timesteps(steps, device=noise.device)
    x, timesteps = noise, scheduler.timesteps
    with torch.no_grad():
        for i, t in enumerate(timesteps):
            output = denoise(x, torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long))
            previous = int(timesteps[i + 1]) if i + 1 < len(timesteps) else None
            x = scheduler.step(output, t, x, prev_timestep=previous, generator=generators).prev_sample
    return x
