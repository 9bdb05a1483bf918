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
from embeddings.config import ConfigError
from training.conditioning import fit_text_tokens, load_clip
from training.data import embedding_shards, require_norm_columns, view_keys
from training.export import save_export
from training.memory import announce, dry_run_sizes, job_estimate
from training.prior import PriorDataModule, PriorModule, raw_statistics, to_batch
from training.prior_net import DiffusionPrior, PriorConfig
from training.published import checked_prior_sizes, statistics_fit
from training.samplers import PriorSampling
from training.settings import JobSpec, Run, check_dim, clip_record
from training.trainer import build_trainer, resume_checkpoint, steps_reached

PRIOR_JOB = JobSpec(
    {"run": Run, "module": PriorModule, "data": PriorDataModule, "trainer": build_trainer},
    exclude=("clip", "embeddings_dir", "run_dir", "callbacks", "raw_norms", "keep"),
    sections={"prior": PriorConfig, "sampling": PriorSampling},
)


def load_prior_config(path: str | Path, overrides: list[str] | None = None) -> dict:
    """A train-prior config (configs/prior/*.yaml plus `key=value` overrides), checked and with defaults filled."""
    return PRIOR_JOB.load(path, overrides)


def report_statistics(net, rows: list[dict]) -> None:
    """Print how the published prior's clip_mean / clip_std fit this data's raw image embeddings; warn when
    they are far off (embeddings of another CLIP than the prior's)."""
    batch = to_batch(rows)
    spread = statistics_fit(net, batch["z_i"] * batch["image_norm"][:, None])
    print(f"init_from: this data's image embeddings in the prior's normalised space have std {spread:.2f} (1 = fit)")
    if not 0.5 < spread < 2.0:
        print(
            "warning: the published prior's clip statistics do not describe these embeddings: were they made with "
            "the prior's own CLIP (Karlo: OpenAI ViT-L/14, open_clip's ViT-L-14-quickgelu; Kandinsky 2.2: ViT-bigG-14 laion2b_s39b_b160k)?"
        )


def prior_estimate(sizes: dict, parts: dict, dry_run: bool = False) -> dict:
    """The memory and FLOP estimate of training a prior of `sizes` with a job's settings (training/memory.py)."""
    return job_estimate(lambda: DiffusionPrior(PriorConfig(**sizes)), parts, dry_run)


def train_prior(**settings) -> dict:
    """Train the prior of a config (PRIOR_JOB's keys) on its data set's embeddings; export to
    models/<name>/prior/; returns the metrics (with `dry_run`: the estimate alone, from the config alone)."""
    parts = PRIOR_JOB.split(settings)
    run = Run(**parts["run"])
    hp = parts["module"]
    if run.dry_run:
        sizes = checked_prior_sizes(hp["init_from"], hp["prior"]) if hp["init_from"] else dict(hp["prior"] or {})
        sizes = dry_run_sizes("prior", sizes, hp["text_tokens"], PriorConfig().to_dict())
        run_dir = run.run_folder("prior", run.name or run.data_name())
        return announce(run_dir, prior_estimate(sizes, parts, dry_run=True))
    layout = run.layout()
    name = run.name or layout.root.name
    run_dir = run.run_folder("prior", name)
    manifest = store.complete_manifest(layout.embeddings)
    clip = clip_record(manifest)
    load_clip(clip)  # a dropped caption is the CLIP's encoding of "": fail before training if it cannot load
    prior = checked_prior_sizes(hp["init_from"], hp["prior"]) if hp["init_from"] else dict(hp["prior"] or {})
    if hp["init_from"] and prior["text_token_width"] and hp["text_tokens"] != "clip":
        raise ConfigError(
            f"the prior at init_from {hp['init_from']} reads per-token text encodings: set text_tokens: clip"
        )
    prior = fit_text_tokens(check_dim("prior", prior, manifest), hp["text_tokens"], clip, "prior")
    raw = PriorConfig(**prior).raw
    announce(run_dir, prior_estimate(prior, parts))
    L.seed_everything(hp["seed"], workers=True)
    module = PriorModule(**dict(hp, prior=prior, clip=clip))
    datamodule = PriorDataModule(
        str(layout.embeddings), **parts["data"], raw_norms=raw, keep=view_keys(layout, run.view)
    )
    for split in ("train", datamodule.val_split):  # every shard's footer read: a damaged one is named now
        shards = embedding_shards(layout.embeddings, split)
        if raw:  # a prior in raw CLIP space reads unit × norm
            require_norm_columns(shards)
    if hp["init_from"]:
        report_statistics(module.net, datamodule.val_rows())
    elif raw:  # from scratch in raw CLIP space: the data's own statistics (a resumed run restores the same)
        module.set_statistics(*raw_statistics(layout.embeddings))
    trainer = build_trainer(run_dir, **parts["trainer"])
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_checkpoint(run_dir, run.resume))
    reached = steps_reached(trainer)
    module.unshard_ema()  # under fsdp2 every rank gathers; then rank 0 evaluates and exports as under DDP
    if not trainer.is_global_zero:
        return {"step": trainer.global_step}
    # The final figures, outside Lightning so no rank waits on another (on the training device: Lightning's
    # teardown has moved the module back to the CPU).
    module = module.to(trainer.strategy.root_device).eval()
    metrics = {**reached, "view": run.view, **module.evaluate(to_batch(datamodule.val_rows()))}
    folder = Path(run.models_root) / name / "prior"
    save_export(folder, "prior", module.ema, module.export_config(metrics), manifest["encoder"])
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    print(f"exported prior to {folder}/  metrics: {run_dir / 'metrics.json'}")
    return metrics
