"""`make train-clip`: a small CLIP trained on our own shards, exported for the embed job.

The LightningModule wraps an open_clip CLIP built from a config (any tower open_clip builds: a
vision transformer, its ModifiedResNet, a timm convnet) and trains it with open_clip's contrastive
loss on the train split, streamed from the tars; it validates zero-shot on val (training/clip_eval.py).
The export is open_clip's own folder layout, which the embed job loads unchanged.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from embeddings.encoders import save_clip_folder
from embeddings.tars import iter_tar_samples
from training.clip_eval import evaluate_clip
from training.data import decode_image, read_tar_range, tar_shards, view_keys
from training.memory import announce, job_estimate
from training.settings import JobSpec, Run
from training.trainer import (
    StreamingDataModule,
    StreamingModule,
    build_trainer,
    resume_checkpoint,
    steps_reached,
    warmup_cosine,
)


def image_transform(model_cfg: dict):
    """open_clip's evaluation transform for this model (the same the embed job applies)."""
    return open_clip.image_transform(model_cfg["vision_cfg"]["image_size"], is_train=False)


class PixelPipe:
    """open_clip's evaluation transform, split so data workers stay cheap.

    Workers only decode and, when an image is not already at the model's size, resize and crop it
    (the transform's own PIL steps); they hand over uint8 (3, H, W). `normalize` then scales and
    standardises whole batches on the trainer's device, the same arithmetic as ToTensor + Normalize.
    """

    def __init__(self, model_cfg: dict):
        self.size = model_cfg["vision_cfg"]["image_size"]
        self.transform = image_transform(model_cfg)
        self.mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)

    def to_uint8(self, data: bytes) -> torch.Tensor:
        image = decode_image(data)
        if image.size != (self.size, self.size):
            for step in self.transform.transforms[:2]:  # Resize, CenterCrop
                image = step(image)
        return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 → float, standardised like open_clip's transform."""
        x = pixels.float() / 255
        return (x - self.mean.to(x.device)) / self.std.to(x.device)


class ClipModule(StreamingModule):
    """open_clip CLIP + ClipLoss, AdamW with warm-up and cosine decay."""

    def __init__(
        self,
        model: dict,
        *,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        warmup_steps: int = 150,
        max_steps: int = 3000,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.model = open_clip.model.CLIP(**model)
        self.loss = open_clip.ClipLoss()
        self.tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=model["text_cfg"].get("context_length", 77))
        self.pixels = PixelPipe(model)
        self._val: list = []

    def trained_network(self) -> torch.nn.Module:
        return self.model

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        return (self.pixels.normalize(batch[0]), *batch[1:])

    def training_step(self, batch, batch_idx):
        pixels, tokens = batch
        image_features, text_features, logit_scale = self.model(pixels, tokens)
        loss = self.count_batch(self.loss(image_features.float(), text_features.float(), logit_scale.float()))
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/logit_scale", logit_scale.detach().float())
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        with torch.no_grad():  # CLIP clamps its temperature at 100
            self.model.logit_scale.clamp_(0, math.log(100))

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """Unit text embeddings, batched, in eval mode."""
        out = []
        for i in range(0, len(texts), 512):
            tokens = self.tokenizer(texts[i : i + 512]).to(self.device)
            out.append(F.normalize(self.model.encode_text(tokens).float(), dim=-1).cpu().numpy())
        return np.concatenate(out)

    def validation_step(self, batch, batch_idx):
        pixels, tokens, meta = batch
        z_i = F.normalize(self.model.encode_image(pixels).float(), dim=-1)
        z_t = F.normalize(self.model.encode_text(tokens).float(), dim=-1)
        self._val.append((z_i.cpu().numpy(), z_t.cpu().numpy(), meta))

    def on_validation_epoch_end(self) -> None:
        if not self._val:
            return
        image_z = np.concatenate([v[0] for v in self._val])
        text_z = np.concatenate([v[1] for v in self._val])
        rows = [m for v in self._val for m in v[2]]
        self._val.clear()
        self.metrics = evaluate_clip(image_z, text_z, rows, self.encode_texts)
        for name in ("colour_accuracy", "shape_accuracy", "recall_at_10"):
            if name in self.metrics:  # zero-shot accuracies only where the data is the shapes world
                self.log(f"val/{name}", self.metrics[name], prog_bar=name != "recall_at_10")

    def configure_optimizers(self):
        decay = [p for n, p in self.model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
        rest = [p for n, p in self.model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.hparams.weight_decay}, {"params": rest, "weight_decay": 0.0}],
            lr=self.hparams.lr,
        )
        hp = self.hparams
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: warmup_cosine(s, hp.warmup_steps, hp.max_steps)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def _one_thread(_: int) -> None:
    torch.set_num_threads(1)


def _collate_val(batch):
    pixels, tokens, meta = zip(*batch)
    return torch.stack(pixels), torch.stack(tokens), list(meta)


class ClipDataModule(StreamingDataModule):
    """Train: the train-split tars (a view's kept samples with `keep`), streamed. Val: up to `val_samples`
    val-split samples, in order, whatever the view."""

    worker_init_fn = staticmethod(_one_thread)  # data workers decode; the trainer's threads do the maths

    def __init__(
        self,
        shards_dir: str,
        model: dict,
        *,
        batch_size: int = 128,
        num_workers: int = 1,
        seed: int = 0,
        shuffle_buffer: int = 2000,
        val_samples: int = 1500,
        keep: dict | None = None,
    ):
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed, shuffle_buffer=shuffle_buffer)
        self.shards_dir, self.val_samples, self.keep = shards_dir, val_samples, keep
        self.pixels = PixelPipe(model)
        self.tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=model["text_cfg"].get("context_length", 77))

    def train_shards(self) -> list:
        return tar_shards(self.shards_dir, "train", self.keep)

    def read(self, shard, start: int, stop: int):
        return read_tar_range(shard, start, stop)

    def decode(self, sample: dict):
        return self.pixels.to_uint8(sample["image"]), self.tokenizer([sample["caption"]])[0]

    def val_dataloader(self) -> DataLoader:
        samples = []
        for shard in tar_shards(self.shards_dir, "val"):
            for sample in iter_tar_samples(shard.path):
                if sample["image"] is not None and len(samples) < self.val_samples:
                    pixels, tokens = self.decode(sample)
                    samples.append((pixels, tokens, sample["meta"]))
        return DataLoader(samples, batch_size=256, collate_fn=_collate_val)


# ------------------------------------------------------------------ the job


@dataclass
class ClipRun(Run):
    """Where train-clip reads and writes, and the dtype of its export."""

    export_dtype: str = "float32"  # or float16: half the file size


CLIP_JOB = JobSpec(
    {"run": ClipRun, "module": ClipModule, "data": ClipDataModule, "trainer": build_trainer},
    exclude=("shards_dir", "keep", "run_dir", "callbacks", "strategy", "launcher"),
    sections={"model": ("embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale")},
)


def load_clip_config(path: str | Path, overrides: list[str] | None = None) -> dict:
    """A train-clip config (configs/clip/*.yaml plus overrides), checked and with defaults filled; 'model' is
    an open_clip model config."""
    return CLIP_JOB.load(path, overrides)


def clip_example_inputs(model: dict, batch: int, device: torch.device | str = "cpu") -> tuple:
    """(images, tokens) of `batch` rows for an open_clip CLIP of config `model`: images at its size, captions of
    its whole context length (what train-clip's estimate runs)."""
    size = model["vision_cfg"]["image_size"]
    height, width = (size, size) if isinstance(size, int) else size
    images = torch.randn(batch, 3, height, width, device=device)
    return images, torch.zeros(batch, model["text_cfg"].get("context_length", 77), dtype=torch.long, device=device)


def clip_estimate(parts: dict, dry_run: bool = False) -> dict:
    """The memory and FLOP estimate of training the config's CLIP (training/memory.py; no EMA copy)."""
    model = parts["module"]["model"]
    inputs = lambda net, batch: clip_example_inputs(model, batch, net.logit_scale.device)
    return job_estimate(lambda: open_clip.model.CLIP(**model), parts, dry_run, inputs, ema=False)


def train_clip(**settings) -> dict:
    """Train a CLIP (CLIP_JOB's keys) on its data set's shards, export it to models/<name>/clip/; returns the metrics
    (with `dry_run`: the estimate alone, from the config alone)."""
    parts = CLIP_JOB.split(settings)
    run = ClipRun(**parts["run"])
    if run.dry_run:
        return announce(run.run_folder("clip", run.name or run.data_name()), clip_estimate(parts, dry_run=True))
    layout = run.layout()
    name = run.name or layout.root.name
    run_dir = run.run_folder("clip", name)
    announce(run_dir, clip_estimate(parts))
    export_dir = Path(run.models_root) / name / "clip"
    seed, model = parts["data"]["seed"], parts["module"]["model"]
    L.seed_everything(seed, workers=True)
    module = ClipModule(**parts["module"])
    datamodule = ClipDataModule(str(layout.shards), **parts["data"], keep=view_keys(layout, run.view))
    trainer = build_trainer(run_dir, **parts["trainer"])
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_checkpoint(run_dir, run.resume))
    metrics = {**steps_reached(trainer), **getattr(module, "metrics", {})}
    if trainer.is_global_zero:
        dtype = {"float32": torch.float32, "float16": torch.float16}[run.export_dtype]
        extra = {"unclip": {"trained_on": run.data, "steps": trainer.global_step, "seed": seed, "metrics": metrics}}
        save_clip_folder(module.model.to(dtype), model, export_dir, extra=extra)
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
        print(f"exported CLIP to {export_dir}/  metrics: {run_dir / 'metrics.json'}")
    return metrics
