"""`make train-prior`: train the prior on a data set's embeddings and export it.

Export (training/export.py): models/<name>/prior/prior.safetensors (EMA weights) + config.json
(network sizes, hyperparameters with the sampling defaults, and the checksum of the CLIP whose
embeddings it was trained on). Loading and sampling it need no Lightning (training/generate.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L

from embeddings import store
from training.conditioning import fit_text_tokens, load_clip
from training.export import save_export
from training.data import embedding_shards
from training.prior import PriorDataModule, PriorModule, to_batch
from training.prior_net import PriorConfig
from training.samplers import PriorSampling
from training.settings import JobSpec, Run, check_dim, clip_record
from training.trainer import build_trainer, resume_checkpoint

PRIOR_JOB = JobSpec(
    {"run": Run, "module": PriorModule, "data": PriorDataModule, "trainer": build_trainer},
    exclude=("clip", "embeddings_dir", "run_dir", "callbacks"),
    sections={"prior": PriorConfig, "sampling": PriorSampling},
)


def load_prior_config(path: str | Path, overrides: list[str] | None = None) -> dict:
    """A train-prior config (configs/prior/*.yaml plus `key=value` overrides), checked and with defaults filled."""
    return PRIOR_JOB.load(path, overrides)


def train_prior(**settings) -> dict:
    """Train the prior of a config (PRIOR_JOB's keys) on its data set's embeddings; export to
    models/<name>/prior/; returns the metrics."""
    parts = PRIOR_JOB.split(settings)
    run = Run(**parts["run"])
    layout = run.layout()
    manifest = store.complete_manifest(layout.embeddings)
    clip = clip_record(manifest)
    load_clip(clip)  # a dropped caption is the CLIP's encoding of "": fail before training if it cannot load
    hp = parts["module"]
    prior = fit_text_tokens(check_dim("prior", hp["prior"], manifest), hp["text_tokens"], clip, "prior")
    name = run.name or layout.root.name
    run_dir = Path(run.outputs_root) / f"train-prior-{name}"
    L.seed_everything(hp["seed"], workers=True)
    module = PriorModule(**dict(hp, prior=prior, clip=clip))
    datamodule = PriorDataModule(str(layout.embeddings), **parts["data"])
    for split in ("train", datamodule.val_split):  # every shard's footer read: a damaged one is named now
        embedding_shards(layout.embeddings, split)
    trainer = build_trainer(run_dir, **parts["trainer"])
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_checkpoint(run_dir, run.resume))
    if not trainer.is_global_zero:
        return {"step": trainer.global_step}
    # The final figures, outside Lightning so no rank waits on another (on the training device: Lightning's
    # teardown has moved the module back to the CPU).
    module = module.to(trainer.strategy.root_device).eval()
    metrics = {"step": trainer.global_step, **module.evaluate(to_batch(datamodule.val_rows()))}
    folder = Path(run.models_root) / name / "prior"
    save_export(folder, "prior", module.ema, module.export_config(metrics), manifest["encoder"])
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    print(f"exported prior to {folder}/  metrics: {run_dir / 'metrics.json'}")
    return metrics
