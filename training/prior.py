"""`make train-prior`: the diffusion prior (text → CLIP image embedding), streaming embedding shards.

The LightningModule holds the loss (MSE on x_0 = √D·z_i, unCLIP §2.2), classifier-free dropout of
the text (10%), AdamW, and an EMA copy of the network used for evaluation, sampling and export.
Sampling: DDIM with few steps, guidance, best-of-N by dot product with z_t (training/diffusion.py).
"""

from __future__ import annotations

import copy
import math

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from embeddings import storage
from training.conditioning import FrozenTextTokens
from training.data import embedding_shards, read_parquet_range
from training.diffusion import ddim_sample, guided, noise_schedule, sample_timesteps, seeded_noise
from training.prior_net import DiffusionPrior, PriorConfig
from training.streaming import ShardStream
from training.trainer import StreamingModule, ema_update, warmup_cosine


class PriorModule(StreamingModule):
    """Diffusion prior training: x_0 prediction, CFG dropout, EMA, periodic evaluation."""

    def __init__(
        self,
        prior: dict,
        lr: float = 3e-4,
        weight_decay: float = 0.05,
        warmup_steps: int = 200,
        max_steps: int = 4000,
        ema_decay: float = 0.999,
        cond_drop_prob: float = 0.1,
        eval_steps: int = 64,
        guidance_scale: float = 1.0,
        candidates: int = 2,
        text_tokens: str = "none",
        clip: dict | None = None,
        seed: int = 0,
    ):
        """`text_tokens`: 'none', or 'clip' for per-token encodings from the frozen CLIP `clip` (EncoderSpec fields)."""
        super().__init__()
        self.save_hyperparameters()
        self.config = PriorConfig(**prior)
        self.net = DiffusionPrior(self.config)
        self.ema = copy.deepcopy(self.net).requires_grad_(False)
        self.schedule = noise_schedule("sample")
        self.scale = math.sqrt(self.config.dim)  # unit vectors → per-dimension variance ~1
        self.metrics: dict = {}
        self._val: list = []
        self._text_tokens = FrozenTextTokens(text_tokens, clip)

    def text_tokens(self, captions: list[str]):
        """(tokens (B, T, W), mask (B, T)) from the frozen CLIP text tower, or (None, None)."""
        return self._text_tokens(captions, self.device)

    def forward_loss(self, z_i, z_t, tokens=None, mask=None, generator=None):
        """MSE between predicted and true x_0 for a batch of (z_i, z_t)."""
        x_0 = z_i * self.scale
        t = sample_timesteps(x_0.shape[0], generator, x_0.device)
        noise = torch.randn(x_0.shape, generator=generator, device=x_0.device)
        x_t = self.schedule.add_noise(x_0, noise, t)
        drop = torch.rand(x_0.shape[0], generator=generator, device=x_0.device) < self.hparams.cond_drop_prob
        return F.mse_loss(self.net(x_t, t, z_t, tokens, mask, drop), x_0)

    def training_step(self, batch, batch_idx):
        tokens, mask = self.text_tokens(batch["caption"])
        # Noise, timesteps and dropout from (seed, step, rank): a resumed run draws what it would have.
        generator = torch.Generator(self.device).manual_seed(
            self.hparams.seed * 1_000_003 + self.global_step * 1009 + self.global_rank
        )
        loss = self.count_batch(self.forward_loss(batch["z_i"], batch["z_t"], tokens, mask, generator))
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        ema_update(self.ema, self.net, self.global_step, self.hparams.ema_decay)

    @torch.no_grad()
    def sample(
        self,
        z_t: torch.Tensor,
        seeds: list[int],
        tokens=None,
        mask=None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        candidates: int | None = None,
        net=None,
    ) -> torch.Tensor:
        """Unit image embeddings (B, D) for text embeddings (B, D): best of N candidates by z_t · z_i."""
        net = net or self.ema
        n = candidates or self.hparams.candidates
        scale = self.hparams.guidance_scale if guidance_scale is None else guidance_scale
        b, d = z_t.shape
        cond = z_t.repeat_interleave(n, 0)
        toks = tokens.repeat_interleave(n, 0) if tokens is not None else None
        msk = mask.repeat_interleave(n, 0) if mask is not None else None
        keep, drop = (
            torch.zeros(b * n, dtype=torch.bool, device=z_t.device),
            torch.ones(b * n, dtype=torch.bool, device=z_t.device),
        )

        def denoise(x_t, t):
            out = net(x_t, t, cond, toks, msk, keep)
            return out if scale == 1.0 else guided(out, net(x_t, t, cond, toks, msk, drop), scale)

        noise = seeded_noise(seeds, (d,), n).to(z_t.device, z_t.dtype)
        x_0 = ddim_sample(denoise, noise, steps or self.hparams.eval_steps, "sample")
        candidates_z = F.normalize(x_0.float(), dim=-1).view(b, n, d)
        best = (candidates_z @ z_t.float().unsqueeze(-1)).squeeze(-1).argmax(1)  # (B,)
        return candidates_z[torch.arange(b), best]

    def validation_step(self, batch, batch_idx):
        self._val.append(
            {"z_i": batch["z_i"].cpu(), "z_t": batch["z_t"].cpu(), "caption": batch["caption"], "scene": batch["scene"]}
        )

    def on_validation_epoch_end(self) -> None:
        if not self._val:
            return
        z_i = torch.cat([v["z_i"] for v in self._val])
        z_t = torch.cat([v["z_t"] for v in self._val])
        captions = [c for v in self._val for c in v["caption"]]
        scenes = [c for v in self._val for c in v["scene"]]
        self._val.clear()
        self.metrics = self.evaluate(z_i, z_t, captions, scenes)
        for name, value in self.metrics.items():
            self.log(f"val/{name}", value, prog_bar=name in ("cosine_predicted", "r_at_1_predicted"))

    @torch.no_grad()
    def evaluate(self, z_i: torch.Tensor, z_t: torch.Tensor, captions: list[str], scenes: list | None = None) -> dict:
        """evaluate_prior for val pairs, sampling with the EMA network (per-pair seeds)."""
        predicted = []
        for i in range(0, len(z_t), 256):
            tokens, mask = self.text_tokens(captions[i : i + 256])
            seeds = list(range(i, min(i + 256, len(z_t))))
            predicted.append(self.sample(z_t[i : i + 256].to(self.device).float(), seeds, tokens, mask).cpu())
        scenes = scenes if scenes and all(s is not None for s in scenes) else None
        return evaluate_prior(torch.cat(predicted).numpy(), z_i.float().numpy(), z_t.float().numpy(), scenes)

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.AdamW(self.net.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: warmup_cosine(s, hp.warmup_steps, hp.max_steps)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def evaluate_prior(predicted: np.ndarray, z_i: np.ndarray, z_t: np.ndarray, scenes: list | None = None) -> dict:
    """Mean cosine to the true image embedding, and the true image's rank among all images (R@1, R@10),
    for the predicted embeddings next to the text embeddings (the baseline).

    With `scenes` (one label per pair, equal labels = images of the same described content, e.g. the
    synthetic source's attributes), `r_at_1_distinct_*` also ranks the true image only against images
    of other scenes: two renders of the same caption cannot be told apart by any text-conditioned model."""
    metrics = {"pairs": len(z_i)}
    same = (
        None if scenes is None else np.asarray(scenes, dtype=object)[:, None] == np.asarray(scenes, dtype=object)[None]
    )
    for name, query in (("predicted", predicted), ("text", z_t)):
        query = query / np.linalg.norm(query, axis=1, keepdims=True)
        metrics[f"cosine_{name}"] = float((query * z_i).sum(1).mean())
        scores = query @ z_i.T
        above = scores > np.diag(scores)[:, None]
        rank = above.sum(1)
        metrics[f"r_at_1_{name}"] = float(np.mean(rank < 1))
        metrics[f"r_at_10_{name}"] = float(np.mean(rank < 10))
        if same is not None:
            metrics[f"r_at_1_distinct_{name}"] = float(np.mean((above & ~same).sum(1) < 1))
    return metrics


SCENE_COLUMNS = (
    "background",
    "n_objects",
    "shape",
    "colour",
    "size",
    "position",
    "shape_2",
    "colour_2",
    "size_2",
    "position_2",
)


def to_batch(rows: list[dict]) -> dict:
    """Embedding rows → a batch: z_i and z_t as (B, D) tensors, keys and captions as lists."""
    return {
        "z_i": torch.from_numpy(np.stack([r["image_embedding"] for r in rows])),
        "z_t": torch.from_numpy(np.stack([r["text_embedding"] for r in rows])),
        "key": [r["key"] for r in rows],
        "caption": [r["caption"] for r in rows],
        "scene": [r.get("scene") for r in rows],
    }


class PriorDataModule(L.LightningDataModule):
    """Train: the train-split embedding shards, streamed. Val: the first `val_pairs` val rows."""

    COLUMNS = ["key", "caption", "image_embedding", "text_embedding"]

    def __init__(
        self,
        embeddings_dir: str,
        batch_size: int = 256,
        num_workers: int = 0,
        seed: int = 0,
        shuffle_buffer: int = 4096,
        val_pairs: int = 1000,
        val_split: str = "val",
    ):
        super().__init__()
        self.embeddings_dir, self.batch_size, self.num_workers = embeddings_dir, batch_size, num_workers
        self.seed, self.shuffle_buffer, self.val_pairs, self.val_split = seed, shuffle_buffer, val_pairs, val_split

    def read(self, shard, start, stop):
        return read_parquet_range(shard, start, stop, self.COLUMNS)

    def train_stream(self, epoch: int, skip_batches: int = 0) -> ShardStream:
        return ShardStream(
            embedding_shards(self.embeddings_dir, "train"),
            self.read,
            lambda r: r,
            self.batch_size,
            seed=self.seed,
            epoch=epoch,
            shuffle_buffer=self.shuffle_buffer,
            skip_batches=skip_batches,
            num_workers=self.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        stream = self.train_stream(self.trainer.current_epoch, self.trainer.lightning_module.data_skip())
        return DataLoader(stream, batch_size=self.batch_size, num_workers=self.num_workers, collate_fn=to_batch)

    def val_rows(self) -> list[dict]:
        """The val pairs, each with a `scene` label from the attribute columns where the data has them."""
        rows = []
        for shard in embedding_shards(self.embeddings_dir, self.val_split):
            present = [c for c in SCENE_COLUMNS if c in storage.parquet_file(shard.path).schema_arrow.names]
            for row in read_parquet_range(shard, 0, shard.count, self.COLUMNS + present):
                row["scene"] = "|".join(str(row.pop(c)) for c in present) if present else None
                rows.append(row)
        return rows[: self.val_pairs]

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_rows(), batch_size=500, collate_fn=to_batch)
