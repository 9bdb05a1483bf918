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
from training.conditioning import FrozenText, fit_text_tokens
from training.data import embedding_shards, require_norm_columns, view_keys
from training.decoder import DecoderModule, UpsamplerModule
from training.decoder_data import ImageEmbeddingDataModule
from training.decoder_net import (
    CAPTION_TOKENS,
    DecoderConfig,
    Upsampler,
    UpsamplerConfig,
    build_decoder,
    decoder_example_inputs,
)
from training.export import save_export
from training.memory import announce, dry_run_sizes, job_estimate
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


def image_estimate(kind: str, sizes: dict, parts: dict, tokens: int = CAPTION_TOKENS, dry_run: bool = False) -> dict:
    """The memory and FLOP estimate of training a decoder or upsampler of `sizes` with a job's settings: a decoder
    reading `tokens` caption tokens, an upsampler on its training crops (training/memory.py)."""
    crop = parts["module"].get("train_crop", 0)
    if kind == "decoder":
        build, config = (lambda: build_decoder(DecoderConfig(**sizes))), DecoderConfig(**sizes)
        inputs = lambda net, batch: decoder_example_inputs(config, batch, next(net.parameters()).device, tokens)
    else:
        build, inputs = (
            (lambda: Upsampler(UpsamplerConfig(**sizes))),
            (lambda net, batch: net.example_inputs(batch, crop)),
        )
    return job_estimate(build, parts, dry_run, inputs)


def _dry_run(kind: str, run: ExportRun, parts: dict, sizes: dict) -> dict:
    """A dry run: the estimate from the config alone, printed and written to the run folder."""
    hp = parts["module"]
    defaults = DecoderConfig().to_dict() if kind == "decoder" else {}  # an upsampler reads z only if its dim is set
    sizes = dry_run_sizes(kind, sizes, hp.get("text_tokens", "none"), defaults)
    run_dir = run.run_folder(run.export or kind, run.name or run.data_name())
    return announce(run_dir, image_estimate(kind, sizes, parts, dry_run=True))


def train_decoder(**settings) -> dict:
    """Train the decoder of a config (DECODER_JOB's keys); exports models/<name>/<export>/ (with `dry_run`:
    the estimate alone, from the config alone)."""
    parts = DECODER_JOB.split(settings)
    run = ExportRun(**parts["run"])
    hp = parts["module"]
    decoder = checked_decoder_sizes(hp["init_from"], hp["decoder"]) if hp["init_from"] else hp["decoder"] or {}
    if run.dry_run:
        return _dry_run("decoder", run, parts, decoder)
    manifest = store.complete_manifest(run.layout().embeddings)
    clip = clip_record(manifest)
    decoder = fit_text_tokens(check_dim("decoder", decoder, manifest), hp["text_tokens"], clip, "decoder")
    tokens = FrozenText("clip", clip).width()[1] if hp["text_tokens"] == "clip" else CAPTION_TOKENS
    L.seed_everything(hp["seed"], workers=True)
    estimated = image_estimate("decoder", decoder, parts, tokens)
    return _fit(DecoderModule(**dict(hp, decoder=decoder, clip=clip)), run, parts, manifest, estimated)


def train_upsampler(**settings) -> dict:
    """Train the 4× upsampler of a config (UPSAMPLER_JOB's keys); exports models/<name>/<export>/ (with
    `dry_run`: the estimate alone, from the config alone)."""
    parts = UPSAMPLER_JOB.split(settings)
    run = ExportRun(**parts["run"])
    hp = parts["module"]
    upsampler = upsampler_sizes(hp["init_from"], hp["upsampler"]) if hp["init_from"] else dict(hp["upsampler"] or {})
    if run.dry_run:
        return _dry_run("upsampler", run, parts, upsampler)
    manifest = store.complete_manifest(run.layout().embeddings)
    upsampler = check_dim("upsampler", upsampler, manifest) if upsampler.get("dim") else upsampler
    L.seed_everything(hp["seed"], workers=True)
    module = UpsamplerModule(**dict(hp, upsampler=upsampler, blur_sigma=tuple(hp["blur_sigma"])))
    return _fit(module, run, parts, manifest, image_estimate("upsampler", upsampler, parts))


def _fit(module, run: ExportRun, parts: dict, manifest: dict, estimated: dict) -> dict:
    """Shared by both jobs: the estimate announced, data, trainer, fit with resume, the final validation, export of
    the EMA weights by rank 0."""
    layout = run.layout()
    name = run.name or layout.root.name
    export = run.export or module.kind
    run_dir = run.run_folder(export, name)
    announce(run_dir, estimated)
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
    module.unshard_ema()  # under fsdp2 every rank gathers; then rank 0 exports as under DDP
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
