"""The prior's jobs: train (make train-prior), export, load, and sample (make sample-prior).

Export (training/export.py): models/<name>/prior/prior.safetensors (EMA weights) + config.json
(network sizes, the sampling defaults, and the checksum of the CLIP whose embeddings it was trained
on). Loading it against another CLIP is an error.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np

from embeddings import store
from embeddings.config import ConfigError, load_job_config
from training.export import load_export, save_export
from training.prior import PriorDataModule, PriorModule, to_batch
from training.prior_net import PriorConfig
from training.trainer import build_trainer, resume_checkpoint

TRAIN_KEYS = (
    "data",
    "data_root",
    "name",
    "prior",
    "lr",
    "weight_decay",
    "warmup_steps",
    "max_steps",
    "batch_size",
    "num_workers",
    "seed",
    "shuffle_buffer",
    "ema_decay",
    "cond_drop_prob",
    "eval_steps",
    "guidance_scale",
    "candidates",
    "text_tokens",
    "precision",
    "accelerator",
    "devices",
    "num_nodes",
    "strategy",
    "val_every",
    "checkpoint_every",
    "log_every",
    "resume",
    "models_root",
    "outputs_root",
    "launcher",
)


def load_prior_config(path: str | Path, overrides: list[str] | None = None) -> dict:
    """A train-prior config with every key checked; 'prior' holds PriorConfig sizes."""
    return load_job_config(path, overrides, TRAIN_KEYS, ("data", "prior"), {"prior": PriorConfig.__dataclass_fields__})


def train_prior(
    data: str,
    prior: dict,
    *,
    data_root: str | None = None,
    name: str | None = None,
    lr: float = 3e-4,
    weight_decay: float = 0.05,
    warmup_steps: int = 200,
    max_steps: int = 4000,
    batch_size: int = 256,
    num_workers: int = 0,
    seed: int = 0,
    shuffle_buffer: int = 4096,
    ema_decay: float = 0.999,
    cond_drop_prob: float = 0.1,
    eval_steps: int = 64,
    guidance_scale: float = 1.0,
    candidates: int = 2,
    text_tokens: str = "none",
    precision: str = "auto",
    accelerator: str = "auto",
    devices: int = 1,
    num_nodes: int = 1,
    strategy: str = "auto",
    val_every: int = 1000,
    checkpoint_every: int = 500,
    log_every: int = 25,
    resume: str | None = "auto",
    models_root: str = "models",
    outputs_root: str = "outputs",
    launcher: str = "lightning",
) -> dict:
    """Train the prior on the embeddings of data config `data`; export to models/<name>/prior/; returns metrics."""
    from pipelines.data_config import load_data_config

    layout = load_data_config(data, [f"data_root={data_root}"] if data_root else None).layout
    manifest = store.read_manifest(layout.embeddings)
    prior = dict(prior)
    if prior.setdefault("dim", manifest["dim"]) != manifest["dim"]:
        raise ConfigError(f"prior.dim {prior['dim']} disagrees with the embeddings' dim {manifest['dim']}")
    name = name or layout.root.name
    run_dir = Path(outputs_root) / f"train-prior-{name}"
    L.seed_everything(seed, workers=True)
    module = PriorModule(
        prior,
        lr=lr,
        weight_decay=weight_decay,
        warmup_steps=warmup_steps,
        max_steps=max_steps,
        ema_decay=ema_decay,
        cond_drop_prob=cond_drop_prob,
        eval_steps=eval_steps,
        guidance_scale=guidance_scale,
        candidates=candidates,
        text_tokens=text_tokens,
        clip={k: manifest["encoder"].get(k) for k in ("model", "weights", "pretrained")},
        seed=seed,
    )
    datamodule = PriorDataModule(str(layout.embeddings), batch_size, num_workers, seed, shuffle_buffer)
    trainer = build_trainer(
        run_dir,
        max_steps=max_steps,
        precision=precision,
        accelerator=accelerator,
        devices=devices,
        num_nodes=num_nodes,
        strategy=strategy,
        val_every=val_every,
        checkpoint_every=checkpoint_every,
        log_every=log_every,
        launcher=launcher,
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_checkpoint(run_dir, resume))
    if trainer.is_global_zero:  # the final figures, outside Lightning so no rank waits on another
        metrics = {"step": trainer.global_step, **evaluate_module(module, datamodule)}
        export_prior(module, Path(models_root) / name / "prior", manifest["encoder"], metrics)
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
        print(f"exported prior to {Path(models_root) / name / 'prior'}/  metrics: {run_dir / 'metrics.json'}")
        return metrics
    return {"step": trainer.global_step}


def evaluate_module(module: PriorModule, datamodule: PriorDataModule) -> dict:
    """The final figures on the val pairs, with the EMA network."""
    batch = to_batch(datamodule.val_rows())
    return module.eval().evaluate(batch["z_i"], batch["z_t"], batch["caption"], batch["scene"])


def export_prior(module: PriorModule, folder: Path, encoder: dict, metrics: dict | None = None) -> Path:
    """EMA weights as safetensors + config.json with the CLIP's checksum."""
    hp = module.hparams
    config = {
        "prior": module.config.to_dict(),
        "text_tokens": hp.text_tokens,
        "metrics": metrics or {},
        "sampling": {"steps": hp.eval_steps, "guidance_scale": hp.guidance_scale, "candidates": hp.candidates},
    }
    return save_export(folder, "prior", module.ema, config, encoder)


def load_prior(folder: str | Path, clip_checksum: str | None = None) -> PriorModule:
    """An exported prior, ready to sample (EMA weights in both net and ema); checks the CLIP if given."""
    config, state = load_export(folder, "prior", clip_checksum)
    s = config["sampling"]
    module = PriorModule(
        config["prior"],
        eval_steps=s["steps"],
        guidance_scale=s["guidance_scale"],
        candidates=s["candidates"],
        text_tokens=config.get("text_tokens", "none"),
        clip=config["clip"],
    )
    module.ema.load_state_dict(state)
    module.net.load_state_dict(state)
    return module.eval()


def sample_prior(
    prompts: list[str],
    prior_dir: str | Path,
    embeddings_dir: str | Path,
    *,
    seed: int = 0,
    steps: int | None = None,
    guidance_scale: float | None = None,
    candidates: int | None = None,
) -> np.ndarray:
    """Text → (N, D) unit CLIP image embeddings, with the CLIP that made `embeddings_dir` (checked)."""
    from embeddings.knn import encoder_from_manifest

    encoder = encoder_from_manifest(embeddings_dir)
    module = load_prior(prior_dir, encoder.checksum)
    z_t = encoder.encode_texts(list(prompts))
    tokens, mask = module.text_tokens(list(prompts))
    seeds = [seed * 1_000_003 + i for i in range(len(prompts))]
    return module.sample(
        z_t, seeds, tokens, mask, steps=steps, guidance_scale=guidance_scale, candidates=candidates
    ).numpy()
