"""Sampling the trained networks, without the trainer stack: plain modules that the LightningModules
call during validation and that generation uses on loaded exports (torch, diffusers, open_clip only).

Each sampler holds a network, what it is conditioned on, and its sampling defaults (the `*Sampling`
dataclasses: the one home of those defaults; a config's `sampling:` section overrides them). Sample
i of a call draws from the streams of seeds[i] only (training/diffusion.py), with a purpose per
stage, so an image depends neither on its batch nor on the other stage's draws.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from training.conditioning import Caption, FrozenText, drop_caption
from training.decoder_net import Upsampler, upsample
from training.diffusion import ddim_sample, guided, seeded_noise, stream, unclip_sample
from training.prior_net import DiffusionPrior


@dataclass
class PriorSampling:
    """How the prior samples: DDIM steps, guidance scale, and best of `candidates` (the paper's 2). 16 steps, where
    the paper took 64: on the previous demo's 300-step prior, 64 gave cosine 0.830 to the true image embedding and
    open diversity 0.56, 16 gave 0.826 and 0.62, in a quarter of the time (README, "Results")."""

    steps: int = 16
    guidance_scale: float = 1.0
    candidates: int = 2


@dataclass
class DecoderSampling:
    """How the decoder samples: steps, eta (DDIM's; 1: fresh noise at every step; a decoder with a learned
    variance samples ancestrally with it and ignores eta), guidance scale."""

    steps: int = 100
    eta: float = 1.0
    guidance_scale: float = 3.0


@dataclass
class UpsamplerSampling:
    """How an upsampler samples: DDIM steps and eta (no guidance: it reads the low-resolution image)."""

    steps: int = 25
    eta: float = 1.0


def sampling_of(kind: type, values: dict | None) -> object:
    """A `*Sampling` of `kind` from a dict of its fields (unknown fields are an error)."""
    return values if isinstance(values, kind) else kind(**(values or {}))


def step_generators(seeds: list[int], purpose: str, per_seed: int = 1) -> list[torch.Generator]:
    """One generator per row (seed-major, `per_seed` rows per seed) for the sampler's per-step noise."""
    return [stream(seed, purpose, row) for seed in seeds for row in range(per_seed)]


def _device(net: torch.nn.Module) -> torch.device:
    return next(net.parameters()).device


class PriorSampler:
    """A prior ready to sample: text embedding → CLIP image embedding, unit (or raw for a raw-space prior) (unCLIP
    §2.2)."""

    def __init__(self, net: DiffusionPrior, text: FrozenText, sampling: PriorSampling | dict | None = None):
        self.net, self.text, self.sampling = net, text, sampling_of(PriorSampling, sampling)
        self.config = net.config

    @torch.no_grad()
    def candidates(
        self,
        z_t: torch.Tensor,
        captions: list[str],
        seeds: list[int],
        steps: int | None = None,
        guidance_scale: float | None = None,
        candidates: int | None = None,
        norms: torch.Tensor | None = None,
        raw: bool = False,
    ) -> torch.Tensor:
        """N image-embedding candidates per caption (B, N, D) for unit text embeddings z_t (B, D) of `captions`:
        DDIM from the starting noise of each seed (N draws of its stream), in the prior's space (a prior in raw
        CLIP space reads z_t × `norms` (B,), the raw text embeddings' norms: the shards' text_norm column, or,
        not given, the norms of the captions as the CLIP encodes them). Unit vectors; with `raw` (priors in raw
        CLIP space only) the raw embeddings, what a decoder in Karlo's layout reads."""
        s = self.sampling
        n = candidates or s.candidates
        scale = s.guidance_scale if guidance_scale is None else guidance_scale
        device = _device(self.net)
        z_t = z_t.to(device).float()
        b, d = z_t.shape
        if raw and not self.config.raw:
            raise ValueError("this prior reads unit CLIP vectors (clip_space unit): it has no raw embeddings to give")
        if self.config.raw:
            z_t = z_t * (self.text.norms(captions, device) if norms is None else norms.to(device).float())[:, None]
        cond = Caption(z_t, *self.text.tokens(list(captions), device))
        if scale != 1.0:  # the unconditional half: every caption dropped
            empty = self.text.empty(device, raw=self.config.raw)
            cond = cond.cat(drop_caption(cond, torch.ones(b, dtype=torch.bool, device=device), empty))
        rows = cond.map(lambda v: v.repeat_interleave(n, 0))  # each caption's N candidates side by side

        def denoise(x_t, t):
            if scale == 1.0:
                return self.net(x_t, t, rows.z_t, rows.tokens, rows.mask)
            out = self.net(torch.cat([x_t, x_t]), torch.cat([t, t]), rows.z_t, rows.tokens, rows.mask)
            return guided(*out.chunk(2), scale)

        noise = seeded_noise(seeds, (d,), "prior_start", n).to(device)
        x_0 = ddim_sample(denoise, noise, steps or s.steps, "sample")
        z = self.net.denormalise(x_0.float()).view(b, n, d)
        return z if raw else F.normalize(z, dim=-1)

    def sample(self, z_t: torch.Tensor, captions: list[str], seeds: list[int], **options) -> torch.Tensor:
        """Image embeddings (B, D), unit (or raw: `raw=True`): of each caption's candidates, the one nearest its
        z_t (unCLIP §2.2)."""
        return best_of(self.candidates(z_t, captions, seeds, **options), z_t.to(_device(self.net)).float())


def best_of(candidates: torch.Tensor, z_t: torch.Tensor) -> torch.Tensor:
    """For each row, the candidate (B, N, D) whose direction has the largest dot product with its z_t (B, D)."""
    best = (F.normalize(candidates, dim=-1) @ z_t.unsqueeze(-1)).squeeze(-1).argmax(1)  # (B,)
    return candidates[torch.arange(len(candidates)), best]


class DecoderSampler:
    """A decoder ready to sample: CLIP embedding z → image at the decoder's base resolution (unCLIP §2.1)."""

    def __init__(
        self,
        net: torch.nn.Module,
        text: FrozenText,
        prediction_type: str,
        condition: str = "image",
        sampling: DecoderSampling | dict | None = None,
    ):
        self.net, self.text, self.prediction_type, self.condition = net, text, prediction_type, condition
        self.sampling = sampling_of(DecoderSampling, sampling)
        self.config = net.config

    def caption(self, captions: list[str] | None, b: int, device) -> Caption:
        """The decoder's caption condition for `captions` (text tokens, and z_t for decoders that read it); none
        given: the dropped caption, for all b rows."""
        if self.text.mode == "none":
            return Caption()
        reads_z_t = self.net.reads_text_embedding
        raw = self.config.raw
        if captions:
            z_t = None
            if reads_z_t:
                unit, norms = self.text.encoder(device).encode_texts(list(captions), norms=True)
                z_t = (unit * norms[:, None] if raw else unit).clone().to(device)
            return Caption(z_t, *self.text.tokens(list(captions), device))
        empty = self.text.empty(device, raw=raw)
        return Caption(empty.z_t if reads_z_t else None, empty.tokens, empty.mask).map(
            lambda v: v.expand(b, *v.shape[1:])
        )

    @torch.no_grad()
    def sample(
        self,
        z: torch.Tensor,
        seeds: list[int],
        captions: list[str] | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
    ) -> torch.Tensor:
        """Images (B, 3, s, s) in [-1, 1] for CLIP vectors z (B, D) (raw for a decoder in Karlo's layout,
        `config.raw`; else unit). No captions: the dropped caption (image variations, interpolations). Guidance:
        the conditional and unconditional halves in one batch, on the prediction (ε or x_0; a learned variance is
        taken from the conditional half, as UnCLIPPipeline does). A decoder with a learned variance samples as
        Karlo does (training/diffusion.py:unclip_sample); the others by DDIM with `eta`."""
        s = self.sampling
        scale = s.guidance_scale if guidance_scale is None else guidance_scale
        device = _device(self.net)
        z = z.to(device).float()
        b, size = z.shape[0], self.config.image_size
        caption = self.caption(captions, b, device)
        drop = None
        if scale != 1.0:  # the unconditional half: z (the network puts its null embedding there) and the caption
            everything = torch.ones(b, dtype=torch.bool, device=device)
            z, drop = torch.cat([z, z]), torch.cat([~everything, everything])
            if caption.tokens is not None:
                caption = caption.cat(drop_caption(caption, everything, self.text.empty(device, raw=self.config.raw)))

        def denoise(x_t, t):
            if scale == 1.0:
                return self.net(x_t, t, z, caption.tokens, caption.mask, z_t=caption.z_t)
            x_t, t = torch.cat([x_t, x_t]), torch.cat([t, t])
            out = self.net(x_t, t, z, caption.tokens, caption.mask, z_t=caption.z_t, drop=drop)
            cond, uncond = out.chunk(2)
            if self.config.learned_variance:
                (eps, values), (eps_uncond, _) = cond.chunk(2, dim=1), uncond.chunk(2, dim=1)
                return torch.cat([guided(eps, eps_uncond, scale), values], dim=1)
            return guided(cond, uncond, scale)

        noise = seeded_noise(seeds, (3, size, size), "decoder_start").to(device)
        generators = step_generators(seeds, "decoder_step")
        if self.config.learned_variance:
            x_0 = unclip_sample(denoise, noise, steps or s.steps, generators, self.prediction_type)
        else:
            x_0 = ddim_sample(
                denoise,
                noise,
                steps or s.steps,
                self.prediction_type,
                clip_sample=True,
                eta=s.eta,
                step_noise=generators,
            )
        return x_0.clamp(-1, 1)


class UpsamplerSampler:
    """An upsampler ready to sample: low-resolution image (and z_i) → image `factor` times larger (unCLIP §2.1)."""

    def __init__(self, net: Upsampler, prediction_type: str, sampling: UpsamplerSampling | dict | None = None):
        self.net, self.prediction_type = net, prediction_type
        self.sampling = sampling_of(UpsamplerSampling, sampling)
        self.config = net.config

    @torch.no_grad()
    def sample(
        self, low: torch.Tensor, seeds: list[int], z: torch.Tensor | None = None, steps: int | None = None
    ) -> torch.Tensor:
        """Images (B, 3, S, S) in [-1, 1] from low-resolution images (B, 3, S/factor, S/factor) in [-1, 1] and,
        for an upsampler built with dim > 0, their CLIP image embeddings z (B, D) (None: the dropped, zero one)."""
        device = _device(self.net)
        low = low.to(device).float()
        if self.config.dim:
            z = z.to(device).float() if z is not None else torch.zeros(len(low), self.config.dim, device=device)
        size = low.shape[-1] * self.config.factor
        cond = upsample(low, size)
        noise = seeded_noise(seeds, (3, size, size), "upsampler_start").to(device)
        x_0 = ddim_sample(
            lambda x_t, t: self.net(x_t, t, cond, z),
            noise,
            steps or self.sampling.steps,
            self.prediction_type,
            clip_sample=True,
            eta=self.sampling.eta,
            step_noise=step_generators(seeds, "upsampler_step"),
        )
        return x_0.clamp(-1, 1)
