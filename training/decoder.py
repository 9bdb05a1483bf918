"""`make train-decoder` and `make train-upsampler`: the image diffusion models of unCLIP.

Both predict v, the noise ε or x_0 (`prediction_type`; ε and x_0 weighted as v's with `v_weight_cap`)
with an MSE loss (a decoder with a learned variance adds the variational bound's term, the hybrid
loss, which by default trains only the variance values' output rows, and a penalty on variance values
outside [-1, 1]: diffusion.py:variance_range_penalty), keep an
EMA copy of the network for sampling, evaluation and export, draw their noise from the stream of
(seed, step, rank) so a resumed run repeats what it would have drawn, and save a PNG grid of
samples from fixed val samples at each validation, so progress is visible. Sampling is
training/samplers.py's.

Decoder: conditioned on a CLIP vector z (the image embedding for unCLIP; the text embedding for the
GLIDE-like baseline of `make eval`; raw vectors in Karlo's layout, unit ones in the other), which is
dropped (zeroed; Karlo's layout: its learned null vector) 10% of the time, and optionally on text
tokens, dropped (the empty caption's) 50% of the time (paper §2.1); sampling applies classifier-free
guidance to the model output.
Upsampler: conditioned on the ×4 smaller image made by box downsampling, blurred with a random
Gaussian during training (the paper's first upsampler); trained on random crops, sampled whole.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from training.conditioning import Caption, FrozenText, drop_caption, drop_embedding
from training.decoder_net import (
    DecoderConfig,
    Upsampler,
    UpsamplerConfig,
    build_decoder,
    downsample,
    upsample,
    variance_values_from_detached_features,
)
from training.diffusion import (
    UNCLIP_PREDICTIONS,
    noise_schedule,
    predicted_x0,
    sample_timesteps,
    stream,
    v_weight,
    variance_range_penalty,
    vlb_term,
)
from training.published import load_published_decoder, load_published_upsampler
from training.grid import save_grid, to_uint8
from training.samplers import DecoderSampler, UpsamplerSampler
from training.trainer import DiffusionModule

# v trains faster at low resolution (fewer wrong global colours); UnCLIPScheduler, and so an export to
# diffusers, takes ε or x_0 ('sample') only (what each gave at the demo's budget: README, "Results").
PREDICTION_TYPES = ("v_prediction", "epsilon", "sample")
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


class ImageDiffusionModule(DiffusionModule):
    """What the decoder and upsampler share: v-, ε- or x_0-loss steps, val loss and sample grids."""

    grid_dir: Path | None = None  # set by the job: where validation writes its sample grids
    grid_samples = 8

    def init_image_nets(self, net: torch.nn.Module) -> None:
        if self.hparams.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type {self.hparams.prediction_type!r}: use one of {', '.join(PREDICTION_TYPES)}"
            )
        if self.hparams.v_weight_cap and self.hparams.prediction_type == "v_prediction":
            raise ValueError("v_weight_cap weighs an ε or x_0 loss as v's: a v loss has its weights already")
        self.init_nets(net)
        self.schedule = noise_schedule(self.hparams.prediction_type)
        self._grid_batch: dict | None = None
        self._val_losses: list[float] = []

    def loss(self, batch: dict, generator: torch.Generator, net: torch.nn.Module) -> torch.Tensor:
        raise NotImplementedError

    def grid(self, batch: dict) -> tuple[torch.Tensor, int]:
        """Images (N, 3, H, W) in [-1, 1] to show for a val batch, and the grid's column count."""
        raise NotImplementedError

    def noised(self, x_0: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_t, t, target) for clean images x_0; the target is ε, v = α·ε − σ·x_0 or x_0 (prediction_type)."""
        t = sample_timesteps(x_0.shape[0], generator, x_0.device)
        noise = torch.randn(x_0.shape, generator=generator, device=x_0.device, dtype=x_0.dtype)
        x_t = self.schedule.add_noise(x_0, noise, t)
        kind = self.hparams.prediction_type
        if kind == "v_prediction":
            return x_t, t, self.schedule.get_velocity(x_0, noise, t)
        return x_t, t, noise if kind == "epsilon" else x_0

    def mse(self, prediction: torch.Tensor, target: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Per-row MSE (B,), weighted as the v objective's where `v_weight_cap` is set."""
        mse = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=tuple(range(1, target.dim())))
        if self.hparams.v_weight_cap:
            mse = mse * v_weight(self.schedule, t, self.hparams.v_weight_cap, self.hparams.prediction_type)
        return mse

    def training_step(self, batch, batch_idx):
        loss = self.count_batch(self.loss(batch, self.step_generator(), self.net))
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        generator = stream(
            self.hparams.seed, "validation", batch_idx, device=self.device
        )  # the same at every validation
        with torch.no_grad():
            self._val_losses.append(float(self.loss(batch, generator, self.ema)))
        if batch_idx == 0:
            self._grid_batch = {k: v[: self.grid_samples] for k, v in batch.items()}

    def on_validation_epoch_end(self) -> None:
        if self._val_losses:
            self.log("val/loss", sum(self._val_losses) / len(self._val_losses), prog_bar=True, sync_dist=True)
            self._val_losses.clear()
        # Rank 0 draws the grid; under fsdp2 every rank samples alongside it (the sharded EMA gathers its weights
        # collectively), each its own first val batch, and rank 0 alone saves.
        if self._grid_batch is not None and self.grid_dir is not None and (self.global_rank == 0 or self.sharded):
            images, columns = self.grid(self._grid_batch)
            if self.global_rank == 0:
                path = save_grid(to_uint8(images), Path(self.grid_dir) / f"step{self.global_step:06d}.png", columns)
                print(f"\nsample grid: {path}")
        self._grid_batch = None


class DecoderModule(ImageDiffusionModule):
    """The CLIP-conditioned decoder: z (B, D) → image at the decoder's base resolution."""

    kind = "decoder"

    def __init__(
        self,
        decoder: dict | None = None,
        clip: dict | None = None,
        *,
        condition: str = "image",
        init_from: str | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 200,
        max_steps: int = 2000,
        ema_decay: float = 0.999,
        cond_drop_prob: float = 0.1,
        text_drop_prob: float = 0.5,
        text_tokens: str = "none",
        prediction_type: str = "v_prediction",
        v_weight_cap: float | None = None,
        bound_trains_network: bool = False,
        sampling: dict | None = None,
        seed: int = 0,
    ):
        """`decoder`: DecoderConfig sizes (with `init_from`: those of the published decoder); `clip`: the CLIP of
        the embeddings (needed with `text_tokens: clip`); `condition`: 'image' (unCLIP) or 'text' (GLIDE-like
        baseline); `init_from`: a Karlo pipeline folder whose decoder/ and text_proj/ weights (its learned null
        embedding too) start training; `v_weight_cap`: an ε or x_0 decoder's MSE weighted as the v objective's,
        the weights capped there (training/diffusion.py:v_weight; None: unweighted); `bound_trains_network`: with a
        learned variance, let the gradient of the variational bound (and of the range penalty) into the whole network,
        as Improved DDPM does (False: they train the variance values' output rows only,
        training/decoder_net.py:variance_values_from_detached_features);
        `sampling`: DecoderSampling fields."""
        super().__init__()
        if condition not in CONDITIONS:
            raise ValueError(f"condition {condition!r}: use 'image' (unCLIP) or 'text' (GLIDE-like baseline)")
        self.save_hyperparameters()
        self.config = DecoderConfig(**(decoder or {}))
        if self.config.learned_variance and prediction_type not in UNCLIP_PREDICTIONS:
            raise ValueError(
                "a decoder with learned_variance samples with UnCLIPScheduler: set prediction_type: epsilon or sample"
            )
        if bound_trains_network and not self.config.learned_variance:
            raise ValueError(
                "bound_trains_network is about the variational bound of a learned variance: set decoder.learned_variance"
            )
        if init_from and (self.config.layout != "karlo" or condition != "image"):
            raise ValueError("a published decoder (init_from) is Karlo's: decoder.layout karlo, condition image")
        net = build_decoder(self.config)
        if init_from:
            load_published_decoder(net, init_from)
        if self.config.learned_variance and not bound_trains_network:
            variance_values_from_detached_features(net.unet.conv_out)
        self.init_image_nets(net)
        self.text = FrozenText(text_tokens, clip)
        self.sampler = DecoderSampler(self.ema, self.text, prediction_type, condition, sampling)

    def condition_of(self, batch: dict) -> torch.Tensor:
        return batch["z_i" if self.hparams.condition == "image" else "z_t"].float()

    def loss(self, batch, generator, net):
        """MSE on the prediction target (weighted as v's with `v_weight_cap`); with a learned variance, plus the
        variational bound's term at t (the hybrid loss of Improved DDPM, as Karlo trains; its gradient stops at the
        variance values' output rows unless `bound_trains_network`) and the penalty that
        pulls variance values back towards the range UnCLIPScheduler interpolates over (variance_range_penalty;
        nothing for values inside it, so a published decoder whose values stay in range trains as before)."""
        x_0 = downsample(batch["image"], self.config.image_size)
        x_t, t, target = self.noised(x_0, generator)
        b = x_0.shape[0]
        drop_z = torch.rand(b, generator=generator, device=x_0.device) < self.hparams.cond_drop_prob
        drop_text = torch.rand(b, generator=generator, device=x_0.device) < self.hparams.text_drop_prob
        z = self.condition_of(batch)
        z_t = batch["z_t"].float() if net.reads_text_embedding else None
        caption = Caption(z_t, *self.text.tokens(batch["caption"], self.device))
        if caption.tokens is not None:
            caption = drop_caption(caption, drop_text, self.text.empty(self.device, raw=self.config.raw))
        output = net(x_t, t, z, caption.tokens, caption.mask, z_t=caption.z_t, drop=drop_z)
        prediction, values = output.float().chunk(2, dim=1) if self.config.learned_variance else (output, None)
        mse = self.mse(prediction, target, t).mean()
        if values is None:
            return mse
        x_0_hat = predicted_x0(self.schedule, prediction, x_t, t, self.hparams.prediction_type)
        bound = vlb_term(self.schedule, x_0_hat, values, x_0, x_t, t) + variance_range_penalty(values)
        return mse + bound.mean()

    def grid(self, batch):
        samples = self.sampler.sample(self.condition_of(batch), list(range(len(batch["key"]))), batch["caption"])
        real = downsample(batch["image"], self.config.image_size).to(samples.device)
        return torch.cat([real, samples]), len(samples)  # top row: the real images; bottom: decoded from their z


class UpsamplerModule(ImageDiffusionModule):
    """The 4× upsampler: low-resolution image → image; blur-augmented conditioning, crop training."""

    kind = "upsampler"

    def __init__(
        self,
        upsampler: dict | None = None,
        *,
        init_from: str | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 200,
        max_steps: int = 2000,
        ema_decay: float = 0.999,
        blur_prob: float = 0.5,
        blur_sigma: tuple[float, float] = (0.4, 0.8),
        train_crop: int = 0,
        prediction_type: str = "v_prediction",
        v_weight_cap: float | None = None,
        cond_drop_prob: float = 0.1,
        sampling: dict | None = None,
        seed: int = 0,
    ):
        """`upsampler`: UpsamplerConfig sizes (with `init_from`: a published UNet2DModel's, Karlo's super_res_first
        or such a folder, whose weights start training); `train_crop`: side of the random crops trained on (0 = whole
        images; a multiple of 4); `v_weight_cap`: as the decoder's; `sampling`: UpsamplerSampling fields."""
        super().__init__()
        self.save_hyperparameters()
        self.config = UpsamplerConfig(**(upsampler or {}))
        if init_from and prediction_type != "epsilon":
            raise ValueError("published super-resolution UNets (Karlo's) predict ε: set prediction_type: epsilon")
        net = Upsampler(self.config)
        if init_from:
            load_published_upsampler(net, init_from)
        self.init_image_nets(net)
        self.sampler = UpsamplerSampler(self.ema, prediction_type, sampling)

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
        drop_z = torch.rand(b, generator=generator, device=low.device) < hp.cond_drop_prob
        z = drop_embedding(batch["z_i"].float(), drop_z) if self.config.dim else None
        if hp.train_crop and hp.train_crop < self.config.image_size:
            c = hp.train_crop
            corners = torch.randint(
                0, self.config.image_size - c + 1, (b, 2), generator=generator, device=low.device
            ).tolist()
            high = torch.stack([high[i, :, y : y + c, x : x + c] for i, (y, x) in enumerate(corners)])
            cond = torch.stack([cond[i, :, y : y + c, x : x + c] for i, (y, x) in enumerate(corners)])
        x_t, t, target = self.noised(high, generator)
        return self.mse(net(x_t, t, cond, z), target, t).mean()

    def grid(self, batch):
        high = downsample(batch["image"], self.config.image_size)
        low = self.low_resolution(high)
        samples = self.sampler.sample(low, list(range(len(low))), batch["z_i"]).to(high.device)
        return torch.cat([upsample(low, self.config.image_size), samples, high]), len(samples)  # bicubic, sampled, real
