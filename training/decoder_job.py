"""The decoder's and upsampler's jobs: train (make train-decoder / train-upsampler), export, load.

Both stream the data set's tars joined by key with its embedding shards (training/decoder_data.py),
and export to models/<name>/<export>/ (decoder, upsampler, or decoder-text for the GLIDE-like
baseline) with the checksum of the CLIP that made the embeddings.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L

from embeddings import store
from embeddings.config import ConfigError, load_job_config
from training.decoder import DecoderModule, UpsamplerModule
from training.decoder_data import ImageEmbeddingDataModule
from training.decoder_net import DecoderConfig, UpsamplerConfig
from training.export import load_export, save_export
from training.trainer import build_trainer, resume_checkpoint

RUN_KEYS = (
    "data",
    "data_root",
    "name",
    "export",
    "lr",
    "weight_decay",
    "warmup_steps",
    "max_steps",
    "batch_size",
    "num_workers",
    "seed",
    "shuffle_buffer",
    "ema_decay",
    "sample_steps",
    "sample_eta",
    "prediction_type",
    "val_samples",
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
DECODER_KEYS = RUN_KEYS + ("decoder", "condition", "cond_drop_prob", "text_drop_prob", "text_tokens", "guidance_scale")
UPSAMPLER_KEYS = RUN_KEYS + ("upsampler", "blur_prob", "blur_sigma", "train_crop", "cond_drop_prob")
RUN_DEFAULTS = dict(
    data_root=None,
    name=None,
    lr=1e-3,
    weight_decay=0.0,
    warmup_steps=200,
    max_steps=2000,
    batch_size=64,
    num_workers=0,
    seed=0,
    shuffle_buffer=2048,
    ema_decay=0.999,
    sample_eta=1.0,
    prediction_type="v_prediction",
    val_samples=256,
    precision="auto",
    accelerator="auto",
    devices=1,
    num_nodes=1,
    strategy="auto",
    val_every=500,
    checkpoint_every=500,
    log_every=25,
    resume="auto",
    models_root="models",
    outputs_root="outputs",
    launcher="lightning",
)


def load_decoder_config(path: str | Path, overrides: list[str] | None = None) -> dict:
    """A train-decoder config with every key checked; 'decoder' holds DecoderConfig sizes."""
    return load_job_config(
        path, overrides, DECODER_KEYS, ("data", "decoder"), {"decoder": DecoderConfig.__dataclass_fields__}
    )


def load_upsampler_config(path: str | Path, overrides: list[str] | None = None) -> dict:
    """A train-upsampler config with every key checked; 'upsampler' holds UpsamplerConfig sizes."""
    return load_job_config(
        path, overrides, UPSAMPLER_KEYS, ("data", "upsampler"), {"upsampler": UpsamplerConfig.__dataclass_fields__}
    )


def _fit(kind: str, module, s: dict, layout, manifest: dict) -> dict:
    """Shared by both jobs: data, trainer, fit with resume, export of the EMA weights by rank 0."""
    image_size = module.config.image_size
    name = s["name"] or layout.root.name
    export = s.get("export") or kind
    run_dir = Path(s["outputs_root"]) / f"train-{export}-{name}"
    module.grid_dir = run_dir / "samples"
    datamodule = ImageEmbeddingDataModule(
        str(layout.shards),
        str(layout.embeddings),
        image_size,
        s["batch_size"],
        s["num_workers"],
        s["seed"],
        s["shuffle_buffer"],
        s["val_samples"],
    )
    trainer = build_trainer(
        run_dir,
        max_steps=s["max_steps"],
        precision=s["precision"],
        accelerator=s["accelerator"],
        devices=s["devices"],
        num_nodes=s["num_nodes"],
        strategy=s["strategy"],
        val_every=s["val_every"],
        checkpoint_every=s["checkpoint_every"],
        log_every=s["log_every"],
        launcher=s["launcher"],
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_checkpoint(run_dir, s["resume"]))
    # The final val loss and sample grid; every rank takes part (under DDP the val loss is averaged over ranks).
    trainer.validate(module, datamodule=datamodule, verbose=False)
    if not trainer.is_global_zero:
        return {"step": trainer.global_step}
    metrics = {
        "step": trainer.global_step,
        "val_loss": float(trainer.callback_metrics.get("val/loss", float("nan"))),
        "join": {split: vars(report) for split, report in datamodule.reports.items()},
    }
    folder = Path(s["models_root"]) / name / export
    config = {kind: module.config.to_dict(), "hparams": dict(module.hparams), "metrics": metrics}
    save_export(folder, kind, module.ema, config, manifest["encoder"])
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    print(f"exported {kind} to {folder}/  sample grids: {module.grid_dir}/  metrics: {run_dir / 'metrics.json'}")
    return metrics


def train_decoder(**settings) -> dict:
    """Train the decoder of a checked config (see configs/decoder/); exports models/<name>/<export>/."""
    s = {
        **RUN_DEFAULTS,
        "condition": "image",
        "cond_drop_prob": 0.1,
        "text_drop_prob": 0.5,
        "text_tokens": "none",
        "sample_steps": 100,
        "guidance_scale": 3.0,
        **settings,
    }
    layout = _layout(s)
    manifest = store.read_manifest(layout.embeddings)
    decoder = dict(s["decoder"])
    _check_dim("decoder", decoder.setdefault("dim", manifest["dim"]), manifest)
    L.seed_everything(s["seed"], workers=True)
    module = DecoderModule(
        decoder,
        condition=s["condition"],
        lr=s["lr"],
        weight_decay=s["weight_decay"],
        warmup_steps=s["warmup_steps"],
        max_steps=s["max_steps"],
        ema_decay=s["ema_decay"],
        cond_drop_prob=s["cond_drop_prob"],
        text_drop_prob=s["text_drop_prob"],
        text_tokens=s["text_tokens"],
        clip=manifest["encoder"],
        sample_steps=s["sample_steps"],
        guidance_scale=s["guidance_scale"],
        sample_eta=s["sample_eta"],
        prediction_type=s["prediction_type"],
        seed=s["seed"],
    )
    return _fit("decoder", module, s, layout, manifest)


def train_upsampler(**settings) -> dict:
    """Train the 4× upsampler of a checked config (see configs/decoder/upsampler-*.yaml); exports models/<name>/upsampler/."""
    s = {
        **RUN_DEFAULTS,
        "blur_prob": 0.5,
        "blur_sigma": (0.4, 0.8),
        "train_crop": 0,
        "sample_steps": 25,
        "cond_drop_prob": 0.1,
        **settings,
    }
    layout = _layout(s)
    manifest = store.read_manifest(layout.embeddings)
    upsampler = dict(s["upsampler"])
    if upsampler.get("dim"):
        _check_dim("upsampler", upsampler["dim"], manifest)
    L.seed_everything(s["seed"], workers=True)
    module = UpsamplerModule(
        upsampler,
        cond_drop_prob=s["cond_drop_prob"],
        lr=s["lr"],
        weight_decay=s["weight_decay"],
        warmup_steps=s["warmup_steps"],
        max_steps=s["max_steps"],
        ema_decay=s["ema_decay"],
        blur_prob=s["blur_prob"],
        blur_sigma=tuple(s["blur_sigma"]),
        train_crop=s["train_crop"],
        sample_steps=s["sample_steps"],
        sample_eta=s["sample_eta"],
        prediction_type=s["prediction_type"],
        seed=s["seed"],
    )
    return _fit("upsampler", module, s, layout, manifest)


def _layout(s: dict):
    from pipelines.data_config import load_data_config

    return load_data_config(s["data"], [f"data_root={s['data_root']}"] if s.get("data_root") else None).layout


def _check_dim(kind: str, dim: int, manifest: dict) -> None:
    if dim != manifest["dim"]:
        raise ConfigError(f"{kind}.dim {dim} disagrees with the embeddings' dim {manifest['dim']}")


def _load(kind: str, module_class, folder: str | Path, clip_checksum: str | None, **fixes):
    """An exported module (EMA weights in both net and ema), ready to sample."""
    config, state = load_export(folder, kind, clip_checksum)
    hp = {k: v for k, v in config["hparams"].items() if k != kind}
    module = module_class(config[kind], **dict(hp, **{k: fix(config, hp) for k, fix in fixes.items()}))
    module.ema.load_state_dict(state)
    module.net.load_state_dict(state)
    return module.eval()


def load_decoder(folder: str | Path, clip_checksum: str | None = None) -> DecoderModule:
    """An exported decoder, ready to sample; checks the CLIP if a checksum is given."""
    return _load("decoder", DecoderModule, folder, clip_checksum, clip=lambda config, hp: config["clip"])


def load_upsampler(folder: str | Path, clip_checksum: str | None = None) -> UpsamplerModule:
    """An exported upsampler, ready to sample."""
    return _load(
        "upsampler", UpsamplerModule, folder, clip_checksum, blur_sigma=lambda config, hp: tuple(hp["blur_sigma"])
    )
