"""What every trainer shares: the Lightning Trainer, precision, resume, the data position, the NaN stop.

The data position (epoch, batches consumed in it) travels in each checkpoint, so a resumed run
continues mid-epoch with the very next batch (see training/streaming.py).
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, Timer, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from embeddings.config import ConfigError
from embeddings.hardware import bf16_is_fast
from training.diffusion import stream
from training.export import FORMATS, attention_layout, check_layout
from training.memory import ActivationCheckpointing, shard
from training.streaming import ShardStream

PRECISIONS = ("auto", "bf16-mixed", "16-mixed", "32")


def on_gpu(accelerator: str) -> bool:
    """Whether a Trainer with this accelerator setting trains on GPUs."""
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def check_precision(precision: str | int) -> str:
    """The precision setting as a string; one not in PRECISIONS is refused, naming the choices."""
    if str(precision) not in PRECISIONS:
        raise ConfigError(f"precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    return str(precision)


def resolve_precision(precision: str | int, accelerator: str = "auto") -> str:
    """A checked precision as Lightning names it: 'auto' → 'bf16-mixed' on GPUs and on CPUs where bf16 is fast
    (AMX, AVX512-BF16: measured by embeddings/hardware.py), else '32-true'; '32' → '32-true'."""
    precision = check_precision(precision)
    if precision == "auto":
        return "bf16-mixed" if on_gpu(accelerator) or bf16_is_fast("cpu") else "32-true"
    return "32-true" if precision == "32" else precision


def fp16_plugin(accelerator: str):
    """fp16 autocast with a dynamic loss scale (torch.amp.GradScaler: the loss is scaled up so small fp16
    gradients do not underflow; a step whose gradients overflow is skipped and the scale halved). Built here
    rather than by Lightning, which turns '16-mixed' into bf16 on a CPU, so the fp16 path is the same on both."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    device = "cuda" if on_gpu(accelerator) else "cpu"
    return MixedPrecision("16-mixed", device, scaler=torch.amp.GradScaler(device))


def resume_checkpoint(run_dir: Path, resume: str | None) -> str | None:
    """'auto' → the run's last.ckpt when there is one; a path → that file; None → start afresh."""
    if resume in (None, "never"):
        return None
    if resume == "auto":
        last = Path(run_dir) / "checkpoints" / "last.ckpt"
        return str(last) if last.exists() else None
    if not Path(resume).is_file():
        raise FileNotFoundError(f"checkpoint to resume from not found: {resume}")
    return resume


def parse_max_time(value) -> timedelta | None:
    """A wall-clock budget for training: 'HH:MM:SS', 'DD:HH:MM:SS' or a number of seconds (None: no budget).
    Seconds because YAML 1.1 reads an unpadded 1:30:00 as the base-60 number 5400, which is then right."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return timedelta(seconds=value)
    parts = str(value).split(":")
    if 3 <= len(parts) <= 4 and all(p.strip().isdigit() for p in parts):
        days, hours, minutes, seconds = ([0] * (4 - len(parts))) + [int(p) for p in parts]
        if days or hours or minutes or seconds:
            return timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)
    raise ConfigError(f"max_time = {value!r}: give 'HH:MM:SS', 'DD:HH:MM:SS' or seconds (> 0), or null for no budget")


def steps_reached(trainer: L.Trainer) -> dict:
    """Print (rank 0) and return how far training went: the step reached and what stopped it (max_steps,
    max_time: the wall-clock budget ran out, or interrupted)."""
    timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
    if trainer.global_step >= trainer.max_steps:
        stopped_by = "max_steps"
    elif timer is not None and timer.time_remaining() is not None and timer.time_remaining() <= 0:
        stopped_by = "max_time"
    else:
        stopped_by = "interrupted"
    if trainer.is_global_zero:
        print(f"trained to step {trainer.global_step} of {trainer.max_steps} (stopped by {stopped_by})")
    return {"step": trainer.global_step, "stopped_by": stopped_by}


def check_accumulation(batches) -> int:
    """accumulate_grad_batches as a whole number ≥ 1; anything else is refused."""
    if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
        raise ConfigError(f"accumulate_grad_batches {batches!r}: give a whole number ≥ 1")
    return batches


def fsdp2_strategy(launcher: str, devices: int | str, num_nodes: int):
    """`strategy: fsdp2`: FSDP2 (fully_shard) over every rank through Lightning's ModelParallelStrategy, with
    checkpoints gathered whole on rank 0 (one file of whole tensors; the data position in it counts batches per
    rank, so a mid-epoch resume needs the same world size)."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    if launcher != "lightning" or not isinstance(devices, int) or devices < 1:
        raise ConfigError(
            "strategy fsdp2 needs launcher lightning (torchrun and SLURM included) and devices as a number ≥ 1"
        )
    return ModelParallelStrategy(
        data_parallel_size=devices * num_nodes, tensor_parallel_size=1, save_distributed_checkpoint=False
    )


def build_trainer(
    run_dir: str | Path,
    *,
    max_steps: int,
    max_time: str | float | None = None,
    precision: str = "auto",
    accelerator: str = "auto",
    devices: int | str = 1,
    num_nodes: int = 1,
    strategy: str = "auto",
    val_every: int = 500,
    checkpoint_every: int = 500,
    log_every: int = 25,
    accumulate_grad_batches: int = 1,
    gradient_checkpointing: bool = False,
    callbacks: list | None = None,
    launcher: str = "lightning",
) -> L.Trainer:
    """A Trainer that logs CSV and TensorBoard under run_dir, checkpoints every N steps and keeps last.ckpt.
    It stops at `max_steps` or when `max_time` (parse_max_time; counted across resumes) is spent, whichever
    comes first.

    launcher 'ray': this process is a Ray Train worker (training/launch.py); Ray's DDP strategy and
    cluster environment replace devices, num_nodes and strategy. `accumulate_grad_batches`: batches whose
    gradients add up to one optimizer step (steps, the schedule, EMA and checkpoints count optimizer steps);
    `gradient_checkpointing`: recompute activations in the backward pass (training/memory.py).
    """
    check_accumulation(accumulate_grad_batches)
    run_dir = Path(run_dir)
    plugins, precision = [], resolve_precision(precision, accelerator)
    if strategy == "fsdp2":
        if precision == "16-mixed":  # a GradScaler sees one rank's shard of the gradients: ranks could disagree
            raise ConfigError("strategy fsdp2 takes precision bf16-mixed or 32, not 16-mixed")
        strategy = fsdp2_strategy(launcher, devices, num_nodes)
    if precision == "16-mixed":
        plugins, precision = [fp16_plugin(accelerator)], None
    if launcher == "ray":
        from ray.train.lightning import RayDDPStrategy, RayLightningEnvironment

        strategy, devices, num_nodes = RayDDPStrategy(), "auto", 1
        plugins.append(RayLightningEnvironment())
    checkpoint = ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        every_n_train_steps=checkpoint_every,
        save_last=True,
        save_top_k=-1,
        filename="step{step:06d}",
        auto_insert_metric_name=False,
    )
    trainer = L.Trainer(
        default_root_dir=run_dir,
        max_steps=max_steps,
        max_time=parse_max_time(max_time),
        max_epochs=-1,
        precision=precision,
        accelerator=accelerator,
        devices=devices,
        num_nodes=num_nodes,
        strategy=strategy,
        plugins=plugins or None,
        logger=[
            CSVLogger(run_dir, name="logs", version=""),
            TensorBoardLogger(run_dir, name="tensorboard", version=""),
        ],
        callbacks=[
            checkpoint,
            LearningRateMonitor("step"),
            TQDMProgressBar(refresh_rate=10),
            *([ActivationCheckpointing()] if gradient_checkpointing else []),
            *(callbacks or []),
        ],
        accumulate_grad_batches=int(accumulate_grad_batches),
        val_check_interval=val_every * int(accumulate_grad_batches),  # Lightning counts batches here
        check_val_every_n_epoch=None,
        log_every_n_steps=log_every,
        reload_dataloaders_every_n_epochs=1,  # each epoch plans its own shard order
        num_sanity_val_steps=0,
        enable_model_summary=False,
    )
    if launcher == "ray":
        from ray.train.lightning import prepare_trainer

        trainer = prepare_trainer(trainer)
    return trainer


build_trainer.config_checks = {
    "precision": check_precision,
    "max_time": parse_max_time,
    "accumulate_grad_batches": check_accumulation,
}  # at config load


def warmup_cosine(step: int, warmup_steps: int, max_steps: int, floor: float = 0.05) -> float:
    """LR multiplier: linear warm-up, then cosine decay to `floor`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, live: torch.nn.Module, step: int, decay: float) -> None:
    """One EMA step of `ema` towards `live`; the decay warms up as (1 + step) / (10 + step)."""
    decay = min(decay, (1 + step) / (10 + step))
    for e, p in zip(ema.parameters(), live.parameters()):
        e.lerp_(p, 1 - decay)


class StreamingModule(L.LightningModule):
    """Base of the trainers: counts batches for the data position, stops on a non-finite loss, seeds each
    step's draws, and records the network's attention layout in checkpoints (refusing another on resume)."""

    def __init__(self):
        super().__init__()
        self.epoch_batches = 0
        self.resume_position: dict | None = None

    def data_skip(self) -> int:
        """Batches of the current epoch already consumed before a resume (0 otherwise)."""
        pos = self.resume_position
        return pos["batches"] if pos and pos["epoch"] == self.current_epoch else 0

    def on_train_epoch_start(self) -> None:
        self.epoch_batches = self.data_skip()

    def on_train_epoch_end(self) -> None:
        self.resume_position = None

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        """A stop asked for mid-step (the wall-clock budget runs out after any batch) waits for the batch that
        completes the optimizer step, so that no checkpoint holds half-accumulated gradients' data position."""
        if self.trainer.should_stop and self.trainer.fit_loop.epoch_loop._should_accumulate():
            self.trainer.should_stop = False  # the budget's callback asks again after the next batch

    def count_batch(self, loss: torch.Tensor) -> torch.Tensor:
        """Call in training_step with the loss: counts the batch and refuses NaN or inf."""
        self.epoch_batches += 1
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"loss is {loss.item()} at step {self.global_step}: training stopped; the last good checkpoint is kept "
                "in the run's checkpoints/ folder (lower the learning rate or check the data)"
            )
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        """Log the gradients' global L2 norm (after the fp16 loss scale is taken off): a rising norm warns of a
        diverging run before its loss turns non-finite."""
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if grads:
            self.log("train/grad_norm", torch.nn.utils.get_total_norm(grads).float(), prog_bar=False)

    def trained_network(self) -> torch.nn.Module:
        """The network the optimizer trains (what gradient checkpointing applies to)."""
        return self.net

    def micro_batch(self) -> int:
        """This batch's place among the batches accumulated into one optimizer step (0 without accumulation)."""
        return (
            self.trainer.fit_loop.epoch_loop.batch_progress.current.ready - 1
        ) % self.trainer.accumulate_grad_batches

    def step_generator(self) -> torch.Generator:
        """The draws of this training batch (timesteps, noise, dropout): the stream of (seed, step, rank), and the
        micro-batch where gradients are accumulated, so a resumed run draws what it would have drawn."""
        micro = self.micro_batch()
        where = (self.global_step, self.global_rank) + ((micro,) if micro else ())
        return stream(self.hparams.seed, "train", *where, device=self.device)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["data_position"] = {"epoch": self.current_epoch, "batches": self.epoch_batches}
        if hasattr(self, "net"):
            checkpoint["format"], checkpoint["layout"] = FORMATS[self.kind], attention_layout(self.net)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Before the weights load: refuse a checkpoint of another format or attention layout."""
        if hasattr(self, "net"):
            if checkpoint.get("format") != FORMATS[self.kind]:
                raise ConfigError(
                    f"the checkpoint is format {checkpoint.get('format', 1)}, this code reads format "
                    f"{FORMATS[self.kind]}: start "
                    "the run afresh (delete the run's outputs/train-*/checkpoints/ folder, `make clean` for every "
                    "run and model, or SET=resume=never)"
                )
            check_layout(self.net, checkpoint.get("layout"), "the checkpoint")
        self.resume_position = checkpoint.get("data_position")


def gather(rows: list) -> list:
    """Every rank's `rows`, concatenated in rank order (this rank's alone outside distributed runs)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return list(rows)
    parts: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, list(rows))
    return [row for part in parts for row in part]


class DiffusionModule(StreamingModule):
    """What the prior, decoder and upsampler trainers share: the network and its EMA copy (what evaluation,
    sampling and export use), AdamW with warm-up and cosine decay, and the export record."""

    kind: str  # prior, decoder, upsampler: the export's file name and config section

    def init_nets(self, net: torch.nn.Module) -> None:
        self.net = net
        self.ema = copy.deepcopy(net).requires_grad_(False)
        self.net_class, self.sharded = type(net), False

    def configure_model(self) -> None:
        """Under `strategy: fsdp2` (a device mesh is set): the network and its EMA copy sharded alike over the
        ranks, so the EMA step stays a local one; frozen parameters stay whole (training/memory.py:shard)."""
        if self.device_mesh is None or self.sharded:
            return
        whole = {name for name, p in self.net.named_parameters() if not p.requires_grad}
        shard(self.net, self.device_mesh["data_parallel"], whole)
        shard(self.ema, self.device_mesh["data_parallel"], whole, trained=False)
        self.sharded = True

    def unshard_ema(self) -> None:
        """After sharded training, called on every rank (it gathers): on rank 0, the EMA copy as one whole network
        again, which its evaluation, sampling and export read; the other ranks keep their shards."""
        if not self.sharded:
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered to rank 0's CPU alone
        state = get_model_state_dict(self.ema, options=options)
        if self.global_rank != 0:
            return
        whole = self.net_class(self.config)
        whole.load_state_dict({k: v.detach().cpu() for k, v in state.items()})
        self.ema = whole.requires_grad_(False).to(self.device)
        self.sampler.net = self.ema

    def on_train_start(self) -> None:
        self._ema_step = self.global_step

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        """An EMA step after each optimizer step (not after a batch whose gradients are still accumulating)."""
        super().on_train_batch_end(outputs, batch, batch_idx)
        if self.global_step > self._ema_step:
            self._ema_step = self.global_step
            ema_update(self.ema, self.net, self.global_step, self.hparams.ema_decay)

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.AdamW(self.net.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: warmup_cosine(s, hp.warmup_steps, hp.max_steps)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def export_config(self, metrics: dict | None = None) -> dict:
        """The export's config.json (less what save_export adds): sizes, hyperparameters with the resolved
        sampling defaults, metrics."""
        hparams = {k: v for k, v in self.hparams.items() if k not in (self.kind, "clip")}
        hparams["sampling"] = asdict(self.sampler.sampling)
        return {self.kind: self.config.to_dict(), "hparams": hparams, "metrics": metrics or {}}


class StreamingDataModule(L.LightningDataModule):
    """Train batches streamed over shards (training/streaming.py: planned per epoch, split over ranks and
    workers, resumed mid-epoch at the data position of the trainer's module). A subclass names its
    train shards, reads a range of one, and may decode records, collate batches and set up workers."""

    collate_fn = None  # DataLoader's default
    worker_init_fn = None

    def __init__(self, *, batch_size: int, num_workers: int, seed: int, shuffle_buffer: int):
        super().__init__()
        self.batch_size, self.num_workers, self.seed, self.shuffle_buffer = (
            batch_size,
            num_workers,
            seed,
            shuffle_buffer,
        )

    def train_shards(self) -> list:
        raise NotImplementedError

    def read(self, shard, start: int, stop: int):
        raise NotImplementedError

    def decode(self, record):
        return record

    def train_stream(self, epoch: int, skip_batches: int = 0) -> ShardStream:
        return ShardStream(
            self.train_shards(),
            self.read,
            self.decode,
            self.batch_size,
            seed=self.seed,
            epoch=epoch,
            shuffle_buffer=self.shuffle_buffer,
            skip_batches=skip_batches,
            num_workers=self.num_workers,
        )

    def train_dataloader(self):
        from torch.utils.data import DataLoader

        stream = self.train_stream(self.trainer.current_epoch, self.trainer.lightning_module.data_skip())
        return DataLoader(
            stream,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=self.collate_fn,
            worker_init_fn=self.worker_init_fn,
        )
