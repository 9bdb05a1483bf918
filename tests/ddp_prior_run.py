"""Two-process runs of the tiny prior for tests: Lightning's DDP (gloo, CPU), torchrun, or two Ray Train workers.

    python tests/ddp_prior_run.py EMBEDDINGS_DIR OUT_DIR [lightning|ray|fsdp2]
    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_prior_run.py EMBEDDINGS_DIR OUT_DIR torchrun

Rewrites the train rows of EMBEDDINGS_DIR into three shards of uneven sizes under OUT_DIR (before
any worker starts), trains one epoch on two CPU processes, and writes what each rank saw (keys of
each batch, each step's loss, a checksum of the final weights) to OUT_DIR/rank{N}.json; then it
validates on both ranks and writes each rank's val figures (and rank 0's own one-process figures
for the same pairs) to OUT_DIR/val{N}.json.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from embeddings import store  # noqa: E402
from training.prior import PriorDataModule, PriorModule, to_batch  # noqa: E402
from training.settings import clip_record  # noqa: E402
from training.trainer import build_trainer  # noqa: E402


class Record(L.Callback):
    def __init__(self, out: Path):
        self.out, self.batches, self.losses = out, [], []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.batches.append(list(batch["key"]))
        self.losses.append(float(outputs["loss"]))

    def on_train_end(self, trainer, module):
        stream = trainer.datamodule.train_stream(0)
        weights = checksum(module.net)
        report = {
            "batches": self.batches,
            "losses": self.losses,
            "weights": weights,
            "ema": checksum(module.ema),
            "sharded_tensors": sum(
                hasattr(p, "full_tensor") for p in [*module.net.parameters(), *module.ema.parameters()]
            ),
            "batches_per_epoch": stream.batches_per_epoch(),
            "shards": len(stream.shards),
            "shard_sizes": [s.count for s in stream.shards],
        }
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(report))


def checksum(net) -> float:
    """A position-weighted sum of a network's weights, whole or sharded (each sharded tensor gathered first, a
    collective): shards gathered in the wrong order, or weights that moved apart, change it."""
    whole = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in net.parameters()]
    return sum(
        float((p.detach().double().abs().flatten() * torch.linspace(1, 2, p.numel(), dtype=torch.float64)).sum())
        for p in whole
    )


def prepare(source: Path, target: Path) -> None:
    """Three train shards of 70, 50 and the rest rows, plus the val shards and the manifest."""
    target.mkdir(parents=True, exist_ok=True)
    table = store.read_table(source)
    train = table.filter(table.column("split").to_numpy(zero_copy_only=False) == "train")
    cuts = [0, 70, 120, train.num_rows]
    for i, (a, b) in enumerate(zip(cuts, cuts[1:])):
        store.write_shard(
            target, f"{i:05d}", train.slice(a, b - a), {"shard": f"{i:05d}", "rows_written": b - a, "skipped": {}}
        )
    val = table.filter(table.column("split").to_numpy(zero_copy_only=False) == "val")
    store.write_shard(target, "00009", val, {"shard": "00009", "rows_written": val.num_rows, "skipped": {}})
    shutil.copy(source / store.MANIFEST, target / store.MANIFEST)


def train(out: str, launcher: str = "lightning", strategy: str = "ddp", **_) -> dict:
    """One epoch (6 steps) of the tiny prior on two CPU processes; each rank writes its record. strategy fsdp2:
    also the EMA copy's checksum once gathered whole (rank 0), and a run stopped at step 3 then resumed from
    its checkpoint, whose losses it writes."""
    out = Path(out)
    L.seed_everything(0, workers=True)
    clip = clip_record(store.read_manifest(out / "embeddings"))
    sizes = {"dim": 32, "width": 32, "depth": 1, "heads": 2}
    module = PriorModule(sizes, clip, max_steps=6, sampling={"steps": 2})
    datamodule = PriorDataModule(str(out / "embeddings"), seed=0, batch_size=16, num_workers=0)
    trainer = build_trainer(
        out / "run",
        max_steps=6,
        precision="32",
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        val_every=1000,
        checkpoint_every=1000,
        callbacks=[Record(out)],
        launcher=launcher,
    )
    trainer.fit(module, datamodule=datamodule)
    if strategy == "fsdp2":
        return resume_sharded(out, module, datamodule, clip, sizes)
    # Validation over both ranks, and (rank 0) the same figures computed in this one process.
    trainer.validate(module, datamodule=datamodule, verbose=False)
    report = {"distributed": module.metrics}
    if trainer.is_global_zero:
        report["one_process"] = module.eval().evaluate(to_batch(datamodule.val_rows()))
    (out / f"val{trainer.global_rank}.json").write_text(json.dumps(report))
    return {"step": trainer.global_step}


def resume_sharded(out: Path, module, datamodule, clip: dict, sizes: dict) -> dict:
    """The EMA gathered whole (its checksum on rank 0); then 3 steps, a checkpoint, and a resumed run to step 6."""
    module.unshard_ema()  # whole on rank 0, still sharded on rank 1
    report = {"ema": checksum(module.ema) if module.global_rank == 0 else None}
    losses = []
    for stop, resume in ((3, None), (6, out / "resumed" / "checkpoints" / "last.ckpt")):
        L.seed_everything(0, workers=True)
        module = PriorModule(sizes, clip, max_steps=6, sampling={"steps": 2})
        record = Record(out / "resumed")
        trainer = build_trainer(
            out / "resumed",
            max_steps=stop,
            precision="32",
            accelerator="cpu",
            devices=2,
            strategy="fsdp2",
            val_every=1000,
            checkpoint_every=3,
            callbacks=[record],
        )
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume)
        losses += record.losses
    report["resumed_losses"] = losses
    (out / f"sharded{trainer.global_rank}.json").write_text(json.dumps(report))
    return {"step": trainer.global_step}


def main() -> None:
    source, out = Path(sys.argv[1]), Path(sys.argv[2]).resolve()
    launcher = sys.argv[3] if len(sys.argv) > 3 else "lightning"
    manifest = out / "embeddings" / store.MANIFEST
    if os.environ.get("LOCAL_RANK", "0") == "0" and not manifest.exists():
        prepare(source, out / "embeddings")
    while not manifest.exists():  # torchrun's rank 1 starts with rank 0: wait for its shards
        time.sleep(0.1)
    if launcher in ("lightning", "torchrun"):  # under torchrun, Lightning takes the ranks from its environment
        train(str(out))
        return
    if launcher == "fsdp2":
        train(str(out), strategy="fsdp2")
        return
    import ray

    from training.launch import ray_train

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        print(
            ray_train(
                train,
                {
                    "out": str(out),
                    "launcher": "ray",
                    "devices": 2,
                    "num_nodes": 1,
                    "accelerator": "cpu",
                    "outputs_root": str(out / "ray"),
                },
            )
        )
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
