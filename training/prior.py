"""`make train-prior`: the diffusion prior (text → CLIP image embedding), streaming embedding shards.

The LightningModule holds the loss (MSE on x_0, the image embedding in the prior's normalised space:
√D·z_i for unit-space priors, (z_i − clip_mean)/clip_std for raw-space ones, unCLIP §2.2), classifier-free dropout of the caption (10%: the
empty caption in its place, training/conditioning.py), AdamW, and an EMA copy of the network used for
evaluation, sampling and export. `init_from` starts from published weights (training/published.py).
A prior in raw CLIP space (`clip_space: raw`, the exportable configs' and every published prior's) reads
unit × the norm columns of the shards; from scratch, its clip_mean / clip_std are measured on the
train split (`raw_statistics`). Sampling is training/samplers.py's
PriorSampler: DDIM with few steps, guidance, best-of-N by dot product with z_t.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from embeddings import store
from pipelines import shapes
from training.conditioning import Caption, FrozenText, drop_caption
from training.data import check_val_split, embedding_shards, read_parquet_range
from training.diffusion import noise_schedule, sample_timesteps
from training.prior_net import DiffusionPrior, PriorConfig
from training.published import load_published_prior
from training.samplers import PriorSampler
from training.trainer import DiffusionModule, StreamingDataModule, gather


class PriorModule(DiffusionModule):
    """Diffusion prior training: x_0 prediction, CFG dropout, EMA, periodic evaluation on val pairs."""

    kind = "prior"

    def __init__(
        self,
        prior: dict | None = None,
        clip: dict | None = None,
        *,
        init_from: str | None = None,
        lr: float = 3e-4,
        weight_decay: float = 0.05,
        warmup_steps: int = 200,
        max_steps: int = 4000,
        ema_decay: float = 0.999,
        cond_drop_prob: float = 0.1,
        text_tokens: str = "none",
        sampling: dict | None = None,
        seed: int = 0,
    ):
        """`prior`: PriorConfig sizes (with `init_from`: those of the published prior); `clip`: the CLIP the
        embeddings were made with (EncoderSpec fields), which encodes the empty caption and, with
        `text_tokens: clip`, per-token encodings; `init_from`: a published prior's folder (Karlo's or
        Kandinsky 2.2's diffusers layout) whose weights start training; `sampling`: PriorSampling fields."""
        super().__init__()
        self.save_hyperparameters()
        self.config = PriorConfig(**(prior or {}))
        net = DiffusionPrior(self.config)
        if init_from:
            load_published_prior(net, init_from)
        self.init_nets(net)
        self.schedule = noise_schedule("sample")
        self.text = FrozenText(text_tokens, clip)
        self.sampler = PriorSampler(self.ema, self.text, sampling)
        self.metrics: dict = {}
        self._val: list[dict] = []

    def set_statistics(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """clip_mean / clip_std (D,) of the training data, in the network and its EMA copy."""
        for net in (self.net, self.ema):
            net.set_statistics(mean, std)

    def caption(self, z_t: torch.Tensor, captions: list[str]) -> Caption:
        """The caption condition of a batch: z_t (in the prior's space) and, with text tokens, their encodings
        and mask."""
        return Caption(z_t.float(), *self.text.tokens(list(captions), self.device))

    def embeddings(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(z_i, z_t) of a batch as the prior reads them: unit vectors, or raw ones (unit × norm) for a prior in
        raw CLIP space."""
        z_i, z_t = batch["z_i"].float(), batch["z_t"].float()
        if self.config.raw:
            z_i, z_t = z_i * batch["image_norm"][:, None].to(z_i), z_t * batch["text_norm"][:, None].to(z_t)
        return z_i, z_t

    def forward_loss(self, z_i: torch.Tensor, caption: Caption, generator: torch.Generator) -> torch.Tensor:
        """MSE between predicted and true x_0 for a batch, captions dropped with probability cond_drop_prob."""
        x_0 = self.net.normalise(z_i)
        t = sample_timesteps(x_0.shape[0], generator, x_0.device)
        noise = torch.randn(x_0.shape, generator=generator, device=x_0.device)
        x_t = self.schedule.add_noise(x_0, noise, t)
        drop = torch.rand(x_0.shape[0], generator=generator, device=x_0.device) < self.hparams.cond_drop_prob
        empty = self.text.empty(self.device, raw=self.config.raw)
        c = drop_caption(caption, drop, empty)
        return F.mse_loss(self.net(x_t, t, c.z_t, c.tokens, c.mask), x_0)

    def training_step(self, batch, batch_idx):
        z_i, z_t = self.embeddings(batch)
        loss = self.count_batch(self.forward_loss(z_i, self.caption(z_t, batch["caption"]), self.step_generator()))
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        """Sample this rank's val pairs (each seeded by its index among all val pairs)."""
        predicted = self.sample_rows(batch)
        for i, index in enumerate(batch["index"]):
            row = {"index": int(index), "predicted": predicted[i], "scene": batch["scene"][i]}
            self._val.append(
                dict(row, z_i=batch["z_i"][i].float().cpu().numpy(), z_t=batch["z_t"][i].float().cpu().numpy())
            )

    def on_validation_epoch_end(self) -> None:
        """The figures over every rank's pairs (a pair the distributed sampler repeated counts once)."""
        rows = {row["index"]: row for row in gather(self._val)}
        self._val.clear()
        if not rows:
            return
        self.metrics = metrics_of([rows[i] for i in sorted(rows)])
        for name, value in self.metrics.items():
            self.log(
                f"val/{name}", float(value), prog_bar=name in ("cosine_predicted", "r_at_1_predicted"), sync_dist=True
            )

    @torch.no_grad()
    def sample_rows(self, batch: dict) -> np.ndarray:
        """Predicted unit image embeddings (B, D) for a batch of val pairs, sampled with the EMA network."""
        z_t = batch["z_t"].to(self.device).float()
        seeds = [int(i) for i in batch["index"]]
        return self.sampler.sample(z_t, batch["caption"], seeds, norms=batch.get("text_norm")).cpu().numpy()

    @torch.no_grad()
    def evaluate(self, batch: dict) -> dict:
        """evaluate_prior for a batch of val pairs in one process (the figures the export records)."""
        predicted = np.concatenate(
            [
                self.sample_rows({k: v[i : i + 256] for k, v in batch.items()})
                for i in range(0, len(batch["index"]), 256)
            ]
        )
        rows = [
            {"predicted": p, "z_i": z_i, "z_t": z_t, "scene": s}
            for p, z_i, z_t, s in zip(
                predicted, batch["z_i"].float().numpy(), batch["z_t"].float().numpy(), batch["scene"]
            )
        ]
        return metrics_of(rows)


def metrics_of(rows: list[dict]) -> dict:
    """evaluate_prior over rows of {predicted, z_i, z_t, scene}."""
    scenes = [r["scene"] for r in rows]
    scenes = scenes if all(s is not None for s in scenes) else None
    stack = lambda key: np.stack([r[key] for r in rows])  # noqa: E731
    return evaluate_prior(stack("predicted"), stack("z_i"), stack("z_t"), scenes)


def evaluate_prior(predicted: np.ndarray, z_i: np.ndarray, z_t: np.ndarray, scenes: list | None = None) -> dict:
    """Mean cosine to the true image embedding, and the true image's rank among all images (R@1, R@10),
    for the predicted embeddings next to the text embeddings (the baseline); `cosine_unrelated` is the
    predicted embedding's cosine to the next pair's image (LAION's third figure).

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
        if name == "predicted":  # to another pair's image: what "unrelated" scores
            metrics["cosine_unrelated"] = float((query * np.roll(z_i, 1, axis=0)).sum(1).mean())
        scores = query @ z_i.T
        above = scores > np.diag(scores)[:, None]
        rank = above.sum(1)
        metrics[f"r_at_1_{name}"] = float(np.mean(rank < 1))
        metrics[f"r_at_10_{name}"] = float(np.mean(rank < 10))
        if same is not None:
            metrics[f"r_at_1_distinct_{name}"] = float(np.mean((above & ~same).sum(1) < 1))
    return metrics


STATISTICS_ROWS = 100_000  # rows of the train split that clip_mean / clip_std are measured on


def raw_statistics(embeddings_dir, rows: int = STATISTICS_ROWS) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std (D,) of the raw image embeddings (unit × image_norm) of the first `rows` train
    pairs, in shard order: the clip_mean / clip_std of a prior trained from scratch in raw CLIP space (what
    Karlo's and Kandinsky's carry for their CLIPs). The same shards give the same figures on every rank."""
    total, sums, squares = 0, 0.0, 0.0
    for shard in embedding_shards(embeddings_dir, "train"):
        table = store.read_shard(shard.path, columns=["image_embedding", "image_norm"])
        z = store.raw_vectors(table.slice(0, rows - total), "image_embedding", str(shard.path)).astype(np.float64)
        total, sums, squares = total + len(z), sums + z.sum(0), squares + (z**2).sum(0)
        if total >= rows:
            break
    if total < 2:
        raise ValueError(f"{embeddings_dir}: too few train pairs ({total}) to measure the prior's clip statistics")
    mean = sums / total
    std = np.sqrt(np.maximum(squares / total - mean**2, 0) * total / (total - 1))
    return torch.from_numpy(mean).float(), torch.from_numpy(np.maximum(std, 1e-6)).float()


def to_batch(rows: list[dict]) -> dict:
    """Embedding rows → a batch: z_i and z_t as (B, D) unit tensors (and their raw norms (B,) where read), keys,
    captions, scenes and indices as lists."""
    batch = {
        "z_i": torch.from_numpy(np.stack([r["image_embedding"] for r in rows])),
        "z_t": torch.from_numpy(np.stack([r["text_embedding"] for r in rows])),
        "key": [r["key"] for r in rows],
        "caption": [r["caption"] for r in rows],
        "scene": [r.get("scene") for r in rows],
        "index": [r.get("index") for r in rows],  # a val pair's position among all val pairs (its seed)
    }
    for column in store.NORM_COLUMNS.values():
        if column in rows[0]:
            batch[column] = torch.tensor([r[column] for r in rows], dtype=torch.float32)
    return batch


class PriorDataModule(StreamingDataModule):
    """Train: the train-split embedding shards (a view's kept rows with `keep`), streamed. Val: the first
    `val_pairs` val rows, whatever the view, so runs on different views are compared on one val set. With
    `raw_norms` (a prior in raw CLIP space), the rows carry the norm columns too."""

    collate_fn = staticmethod(to_batch)

    def __init__(
        self,
        embeddings_dir: str,
        *,
        seed: int,
        batch_size: int = 256,
        num_workers: int = 0,
        shuffle_buffer: int = 4096,
        val_pairs: int = 1000,
        val_split: str = "val",
        raw_norms: bool = False,
        keep: dict | None = None,
    ):
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed, shuffle_buffer=shuffle_buffer)
        check_val_split(val_split)
        self.embeddings_dir, self.val_pairs, self.val_split = embeddings_dir, val_pairs, val_split
        self.keep = keep  # a view's kept keys per shard (training/data.py:view_keys): train reads only those
        self.columns = ["key", "caption", "image_embedding", "text_embedding"]
        if raw_norms:
            self.columns += list(store.NORM_COLUMNS.values())

    def train_shards(self) -> list:
        return embedding_shards(self.embeddings_dir, "train", self.keep)

    def read(self, shard, start, stop):
        return read_parquet_range(shard, start, stop, self.columns)

    def val_rows(self) -> list[dict]:
        """The val pairs, each with a `scene` label from the attribute columns where the data has them."""
        rows = []
        for shard in embedding_shards(self.embeddings_dir, self.val_split):
            present = [c for c in shapes.SCENE_COLUMNS if c in store.shard_file(shard.path).schema_arrow.names]
            stop = min(shard.count, self.val_pairs - len(rows))
            for row in read_parquet_range(shard, 0, stop, self.columns + present):
                row["scene"] = "|".join(str(row.pop(c)) for c in present) if present else None
                rows.append(row)
            if len(rows) >= self.val_pairs:
                break
        return [dict(row, index=i) for i, row in enumerate(rows)]

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_rows(), batch_size=500, collate_fn=to_batch)
