"""`make train-decoder` and `make train-upsampler`: train the image models and export them.

Both stream the data set's tars joined by key with its embedding shards (training/decoder_data.py),
and export to models/<name>/<export>/ (decoder, upsampler, or decoder-text for the GLIDE-like
baseline) with the checksum of the CLIP that made the embeddings. Loading and sampling the exports
need no Lightning (training/export.py, training/generate.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L

from embeddings import store
from training.conditioning import fit_text_tokens
from training.data import embedding_shards, require_norm_columns, view_keys
from training.decoder import DecoderModule, UpsamplerModule
from training.decoder_data import ImageEmbeddingDataModule
from training.decoder_net import DecoderConfig, UpsamplerConfig
from training.export import save_export
from training.published import checked_decoder_sizes, upsampler_sizes
from training.samplers import DecoderSampling, UpsamplerSampling
from training.settings import ExportRun, JobSpec, check_dim, clip_record
from training.trainer import build_trainer, resume_checkpoint, steps_reached

_SET_BY_JOB = ("clip", "shards_dir", "embeddings_dir", "image_size", "raw_norms", "keep", "run_dir", "callbacks")
DECODER_JOB = JobSpec(
    {"run": ExportRun, "module": DecoderModule, "data": ImageEmbeddingDataModule, "trainer": build_trainer},
    exclude=_SET_BY_JOB,
    sections={"decoder": DecoderConfig, "sampling": DecoderSampling},
)
UPSAMPLER_JOB = JobSpec(
    {"run": ExportRun, "module": UpsamplerModule, "data": ImageEmbeddingDataModule, "trainer": build_trainer},
    exclude=_SET_BY_JOB,
    sections={"upsampler": UpsamplerConfig, "sampling": UpsamplerSampling},
)


def load_decoder_config(path: str | Path, overrides: list[str] | None = None) -> dict:
    """A train-decoder config (configs/decoder/*.yaml plus overrides), checked and with defaults filled."""
    return DECODER_JOB.load(path, overrides)


def load_upsampler_config(path: str | Path, overrides: list[str] | None = None) -> dict:
    """A train-upsampler config (configs/decoder/upsampler-*.yaml plus overrides), checked and with defaults filled."""
    return UPSAMPLER_JOB.load(path, overrides)


def train_decoder(**settings) -> dict:
    """Train the decoder of a config (DECODER_JOB's keys); exports models/<name>/<export>/."""
    parts = DECODER_JOB.split(settings)
    run = ExportRun(**parts["run"])
    manifest = store.complete_manifest(run.layout().embeddings)
    clip, hp = clip_record(manifest), parts["module"]
    decoder = checked_decoder_sizes(hp["init_from"], hp["decoder"]) if hp["init_from"] else hp["decoder"] or {}
    decoder = fit_text_tokens(check_dim("decoder", decoder, manifest), hp["text_tokens"], clip, "decoder")
    L.seed_everything(hp["seed"], workers=True)
    return _fit(DecoderModule(**dict(hp, decoder=decoder, clip=clip)), run, parts, manifest)


def train_upsampler(**settings) -> dict:
    """Train the 4× upsampler of a config (UPSAMPLER_JOB's keys); exports models/<name>/<export>/."""
    parts = UPSAMPLER_JOB.split(settings)
    run = ExportRun(**parts["run"])
    manifest = store.complete_manifest(run.layout().embeddings)
    hp = parts["module"]
    upsampler = upsampler_sizes(hp["init_from"], hp["upsampler"]) if hp["init_from"] else dict(hp["upsampler"] or {})
    upsampler = check_dim("upsampler", upsampler, manifest) if upsampler.get("dim") else upsampler
    L.seed_everything(hp["seed"], workers=True)
    return _fit(
        UpsamplerModule(**dict(hp, upsampler=upsampler, blur_sigma=tuple(hp["blur_sigma"]))), run, parts, manifest
    )


def _fit(module, run: ExportRun, parts: dict, manifest: dict) -> dict:
    """Shared by both jobs: data, trainer, fit with resume, the final validation, export of the EMA weights by rank 0."""
    layout = run.layout()
    name = run.name or layout.root.name
    export = run.export or module.kind
    run_dir = run.run_folder(export, name)
    module.grid_dir = run_dir / "samples"
    raw = getattr(module.config, "raw", False)  # a decoder in Karlo's layout reads raw CLIP vectors
    datamodule = ImageEmbeddingDataModule(
        str(layout.shards),
        str(layout.embeddings),
        image_size=module.config.image_size,
        raw_norms=raw,
        keep=view_keys(layout, run.view),
        **parts["data"],
    )
    for split in ("train", datamodule.val_split):  # the join reads every tar and shard now: damage is named here
        datamodule.shards(split)
        if raw:  # a decoder in Karlo's layout reads unit × norm
            require_norm_columns(embedding_shards(layout.embeddings, split))
    trainer = build_trainer(run_dir, **parts["trainer"])
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_checkpoint(run_dir, run.resume))
    reached = steps_reached(trainer)
    # The final val loss and sample grid; every rank takes part (under DDP the val loss is averaged over ranks).
    trainer.validate(module, datamodule=datamodule, verbose=False)
    if not trainer.is_global_zero:
        return {"step": trainer.global_step}
    metrics = {
        **reached,
        "view": run.view,
        "val_loss": float(trainer.callback_metrics.get("val/loss", float("nan"))),
        "join": {split: vars(report) for split, report in datamodule.reports.items()},
    }
    folder = Path(run.models_root) / name / export
    save_export(folder, module.kind, module.ema, module.export_config(metrics), manifest["encoder"])
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    print(f"exported {module.kind} to {folder}/  sample grids: {module.grid_dir}/  metrics: {run_dir / 'metrics.json'}")
    return metrics
