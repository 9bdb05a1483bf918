"""`make train-decoder` and `make train-upsampler`: the image diffusion models of unCLIP.

Both predict v (or the noise ε; `prediction_type`) with an MSE loss, keep an EMA copy of the network for sampling, evaluation and export,
draw their noise from (seed, step, rank) so a resumed run repeats what it would have drawn, and
save a PNG grid of samples from fixed val samples at each validation, so progress is visible.

Decoder: conditioned on a CLIP vector z (the image embedding for unCLIP; the text embedding for the
GLIDE-like baseline of `make eval`), which is zeroed 10% of the time, and optionally on text tokens,
dropped 50% of the time (paper §2.1); sampling applies classifier-free guidance to ε.
Upsampler: conditioned on the ×4 smaller image made by box downsampling, blurred with a random
Gaussian during training (the paper's first upsampler); trained on random crops, sampled whole.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F

from training.conditioning import FrozenTextTokens
from training.decoder_net import Decoder, DecoderConfig, Upsampler, UpsamplerConfig, downsample, upsample
from training.diffusion import ddim_sample, guided, noise_schedule, sample_timesteps, seeded_noise
from training.grid import save_grid, to_uint8
from training.trainer import StreamingModule, ema_update, warmup_cosine

PREDICTION_TYPES = ("v_prediction", "epsilon")  # v trains faster at low resolution: fewer wrong global colours
CONDITIONS = ("image", "text")  # which CLIP embedding the decoder reads: z_i (unCLIP) or z_t (GLIDE-like)


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, radius: int = 2) -> torch.Tensor:
    """Blur each image of (B, C, H, W) with its own Gaussian σ (B,) in pixels (separable, reflect padding)."""
    b, c, h, w = images.shape
    offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    kernel = torch.exp(-(offsets[None] ** 2) / (2 * sigma[:, None].clamp_min(1e-3) ** 2))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (B·C, K)
    x = images.reshape(1, b * c, h, w)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), kernel[:, None, None, :], groups=b * c)
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), kernel[:, None, :, None], groups=b * c)
    return x.reshape(b, c, h, w)


class ImageDiffusionModule(StreamingModule):
    """What the decoder and upsampler share: ε-loss steps, EMA, optimiser, val loss and sample grids."""

    grid_dir: Path | None = None  # set by the job: where validation writes its sample grids
    grid_samples = 8

    def init_nets(self, net: torch.nn.Module) -> None:
        if self.hparams.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type {self.hparams.prediction_type!r}: use one of {', '.join(PREDICTION_TYPES)}"
            )
        self.net = net
        self.ema = copy.deepcopy(net).requires_grad_(False)
        self.schedule = noise_schedule(self.hparams.prediction_type)
        self._grid_batch: dict | None = None
        self._val_losses: list[float] = []

    def loss(self, batch: dict, generator: torch.Generator, net: torch.nn.Module) -> torch.Tensor:
        raise NotImplementedError

    def grid(self, batch: dict) -> tuple[torch.Tensor, int]:
        """Images (N, 3, H, W) in [-1, 1] to show for a val batch, and the grid's column count."""
        raise NotImplementedError

    def noised(self, x_0: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_t, t, target) for clean images x_0; the target is ε or v = α·ε − σ·x_0 (prediction_type)."""
        t = sample_timesteps(x_0.shape[0], generator, x_0.device)
        noise = torch.randn(x_0.shape, generator=generator, device=x_0.device, dtype=x_0.dtype)
        x_t = self.schedule.add_noise(x_0, noise, t)
        target = self.schedule.get_velocity(x_0, noise, t) if self.hparams.prediction_type == "v_prediction" else noise
        return x_t, t, target

    def training_step(self, batch, batch_idx):
        generator = torch.Generator(self.device).manual_seed(
            self.hparams.seed * 1_000_003 + self.global_step * 1009 + self.global_rank
        )
        loss = self.count_batch(self.loss(batch, generator, self.net))
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        ema_update(self.ema, self.net, self.global_step, self.hparams.ema_decay)

    def validation_step(self, batch, batch_idx):
        generator = torch.Generator(self.device).manual_seed(10_007 + batch_idx)  # the same noise at every validation
        with torch.no_grad():
            self._val_losses.append(float(self.loss(batch, generator, self.ema)))
        if batch_idx == 0:
            self._grid_batch = {k: v[: self.grid_samples] for k, v in batch.items()}

    def on_validation_epoch_end(self) -> None:
        if self._val_losses:
            self.log("val/loss", sum(self._val_losses) / len(self._val_losses), prog_bar=True, sync_dist=True)
            self._val_losses.clear()
        if self._grid_batch is not None and self.grid_dir is not None and self.global_rank == 0:
            images, columns = self.grid(self._grid_batch)
            path = save_grid(to_uint8(images), Path(self.grid_dir) / f"step{self.global_step:06d}.png", columns)
            print(f"\nsample grid: {path}")
        self._grid_batch = None

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.AdamW(self.net.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: warmup_cosine(s, hp.warmup_steps, hp.max_steps)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class DecoderModule(ImageDiffusionModule):
    """The CLIP-conditioned decoder: z (B, D) → image at the decoder's base resolution."""

    def __init__(
        self,
        decoder: dict,
        condition: str = "image",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 200,
        max_steps: int = 2000,
        ema_decay: float = 0.999,
        cond_drop_prob: float = 0.1,
        text_drop_prob: float = 0.5,
        text_tokens: str = "none",
        clip: dict | None = None,
        sample_steps: int = 100,
        sample_eta: float = 1.0,
        guidance_scale: float = 3.0,
        prediction_type: str = "v_prediction",
        seed: int = 0,
    ):
        """`condition`: 'image' (unCLIP) or 'text' (GLIDE-like baseline); `text_tokens`: 'none' or 'clip'."""
        super().__init__()
        if condition not in CONDITIONS:
            raise ValueError(f"condition {condition!r}: use 'image' (unCLIP) or 'text' (GLIDE-like baseline)")
        self.save_hyperparameters()
        self.config = DecoderConfig(**decoder)
        self.init_nets(Decoder(self.config))
        self._text_tokens = FrozenTextTokens(text_tokens, clip)

    def condition_of(self, batch: dict) -> torch.Tensor:
        return batch["z_i" if self.hparams.condition == "image" else "z_t"].float()

    def loss(self, batch, generator, net):
        x_0 = downsample(batch["image"], self.config.image_size)
        z = self.condition_of(batch)
        x_t, t, noise = self.noised(x_0, generator)
        b = x_0.shape[0]
        drop_z = torch.rand(b, generator=generator, device=x_0.device) < self.hparams.cond_drop_prob
        drop_text = torch.rand(b, generator=generator, device=x_0.device) < self.hparams.text_drop_prob
        tokens, mask = self._text_tokens(batch["caption"], self.device)
        return F.mse_loss(net(x_t, t, z, tokens, mask, drop_z, drop_text), noise)

    @torch.no_grad()
    def sample(
        self,
        z: torch.Tensor,
        seeds: list[int],
        captions: list[str] | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        net: torch.nn.Module | None = None,
    ) -> torch.Tensor:
        """Images (B, 3, s, s) in [-1, 1] for CLIP vectors z (B, D); sample i starts from noise of seeds[i]."""
        net = net or self.ema
        scale = self.hparams.guidance_scale if guidance_scale is None else guidance_scale
        z = z.to(self.device).float()
        b, size = z.shape[0], self.config.image_size
        tokens, mask = self._text_tokens(captions or [""] * b, self.device)
        keep = torch.zeros(b, dtype=torch.bool, device=self.device)
        if scale != 1.0:  # one forward pass holds the conditional and the unconditional half
            z = torch.cat([z, z])
            tokens = torch.cat([tokens, tokens]) if tokens is not None else None
            mask = torch.cat([mask, mask]) if mask is not None else None
            keep = torch.cat([keep, ~keep])

        def denoise(x_t, t):
            if scale == 1.0:
                return net(x_t, t, z, tokens, mask, keep, keep)
            cond, uncond = net(torch.cat([x_t, x_t]), torch.cat([t, t]), z, tokens, mask, keep, keep).chunk(2)
            return guided(cond, uncond, scale)

        noise = seeded_noise(seeds, (3, size, size)).to(self.device)
        x_0 = ddim_sample(
            denoise,
            noise,
            steps or self.hparams.sample_steps,
            self.hparams.prediction_type,
            clip_sample=True,
            eta=self.hparams.sample_eta,
            seeds=seeds,
        )
        return x_0.clamp(-1, 1)

    def grid(self, batch):
        samples = self.sample(self.condition_of(batch), list(range(len(batch["key"]))), batch["caption"])
        real = downsample(batch["image"], self.config.image_size).to(samples.device)
        return torch.cat([real, samples]), len(samples)  # top row: the real images; bottom: decoded from their z


class UpsamplerModule(ImageDiffusionModule):
    """The 4× upsampler: low-resolution image → image; blur-augmented conditioning, crop training."""

    def __init__(
        self,
        upsampler: dict,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 200,
        max_steps: int = 2000,
        ema_decay: float = 0.999,
        blur_prob: float = 0.5,
        blur_sigma: tuple[float, float] = (0.4, 0.8),
        train_crop: int = 0,
        sample_steps: int = 25,
        sample_eta: float = 1.0,
        prediction_type: str = "v_prediction",
        cond_drop_prob: float = 0.1,
        seed: int = 0,
    ):
        """`train_crop`: side of the random crops trained on (0 = whole images; a multiple of 4)."""
        super().__init__()
        self.save_hyperparameters()
        self.config = UpsamplerConfig(**upsampler)
        self.init_nets(Upsampler(self.config))

    def low_resolution(self, images: torch.Tensor) -> torch.Tensor:
        return downsample(images, self.config.image_size // self.config.factor)

    def loss(self, batch, generator, net):
        hp = self.hparams
        high = downsample(batch["image"], self.config.image_size)
        low = self.low_resolution(high)
        b = low.shape[0]
        lo, hi = hp.blur_sigma
        sigma = lo + (hi - lo) * torch.rand(b, generator=generator, device=low.device)
        blur = torch.rand(b, generator=generator, device=low.device) < hp.blur_prob
        low = torch.where(blur[:, None, None, None], gaussian_blur(low, sigma), low)
        cond = upsample(low, self.config.image_size)
        z = batch["z_i"].float() if self.config.dim else None
        drop_z = torch.rand(b, generator=generator, device=low.device) < hp.cond_drop_prob
        if hp.train_crop and hp.train_crop < self.config.image_size:
            c = hp.train_crop
            corners = torch.randint(
                0, self.config.image_size - c + 1, (b, 2), generator=generator, device=low.device
            ).tolist()
            high = torch.stack([high[i, :, y : y + c, x : x + c] for i, (y, x) in enumerate(corners)])
            cond = torch.stack([cond[i, :, y : y + c, x : x + c] for i, (y, x) in enumerate(corners)])
        x_t, t, noise = self.noised(high, generator)
        return F.mse_loss(net(x_t, t, cond, z, drop_z), noise)

    @torch.no_grad()
    def sample(
        self,
        low: torch.Tensor,
        seeds: list[int],
        z: torch.Tensor | None = None,
        steps: int | None = None,
        net: torch.nn.Module | None = None,
    ) -> torch.Tensor:
        """Images (B, 3, S, S) in [-1, 1] from low-resolution images (B, 3, S/4, S/4) in [-1, 1] and, for an
        upsampler built with dim > 0, their CLIP image embeddings z (B, D) (None: zeroed, as dropped in training)."""
        net = net or self.ema
        low = low.to(self.device).float()
        if self.config.dim:  # no z: the zeroed embedding it learned from the 10% dropped in training
            z = (
                z.to(self.device).float()
                if z is not None
                else torch.zeros(len(low), self.config.dim, device=self.device)
            )
        size = low.shape[-1] * self.config.factor
        cond = upsample(low, size)
        noise = seeded_noise(seeds, (3, size, size)).to(self.device)
        x_0 = ddim_sample(
            lambda x_t, t: net(x_t, t, cond, z),
            noise,
            steps or self.hparams.sample_steps,
            self.hparams.prediction_type,
            clip_sample=True,
            eta=self.hparams.sample_eta,
            seeds=seeds,
        )
        return x_0.clamp(-1, 1)

    def grid(self, batch):
        high = downsample(batch["image"], self.config.image_size)
        low = self.low_resolution(high)
        samples = self.sample(low, list(range(len(low))), batch["z_i"]).to(high.device)
        return torch.cat([upsample(low, self.config.image_size), samples, high]), len(samples)  # bicubic, sampled, real
