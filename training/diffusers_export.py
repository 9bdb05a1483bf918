"""`make export-diffusers`: our exports as folders that diffusers' pipelines load and run offline.

A models folder with prior/, decoder/ and upsampler/ exports as an `UnCLIPPipeline` folder (Karlo's
layout): `prior/` our PriorTransformer as it is, `text_proj/` and `decoder/` our KarloDecoder's two
parts, the upsampler's UNet2DModel as both `super_res_first/` and `super_res_last/`, `text_encoder/`
converted from the open_clip CLIP they were trained against (CLIPTextModelWithProjection),
`tokenizer/` written from open_clip's BPE vocabulary, and three `UnCLIPScheduler` configs on our
training schedule (prior: x_0 without clipping; decoder: its ε or x_0 with the learned variance;
super-resolution: its ε or x_0 with the fixed small variance). A prior alone exports as a `KandinskyV22PriorPipeline` folder, which
also needs the CLIP's image tower (`image_encoder/`, `image_processor/`).

The networks and their inputs are ours exactly (tested stage by stage). What the pipelines do that
ours does not: they draw all noise from one generator, space their timesteps their own way (ancestral
steps where our prior and upsampler run DDIM), return the prior's last sample rather than the best of
N, and apply guidance to the decoder only through one scale for both halves; so whole runs are not
equal, the networks' calls are.

What cannot export, and why (each an error that says so): a prior or decoder on unit CLIP vectors
(the pipelines feed raw ones), a decoder not in Karlo's layout, or one predicting v, an upsampler that
reads the CLIP image embedding (the pipeline's super-resolution call passes none) or predicts v, and,
for the prior pipeline, a CLIP whose image tower is not a ViT (the default CLIP's ResNet).
"""

from __future__ import annotations

import json
from pathlib import Path

from embeddings.config import ConfigError
from training.diffusion import UNCLIP_PREDICTIONS

# diffusers 0.42.1 saves UnCLIPPipeline's text projection as ["diffusers", "UnCLIPTextProjModel"], which its own
# from_pretrained cannot import (the class lives under pipelines.deprecated.unclip), and Karlo's folders say
# ["unclip", ...], which it refuses too; the module that defines the class loads.
TEXT_PROJ = ["diffusers.pipelines.deprecated.unclip.text_proj", "UnCLIPTextProjModel"]


def _text_parts(sampler, where: Path):
    """(CLIPTextModelWithProjection, context length) of the CLIP a sampler reads captions with; its tokenizer
    must be open_clip's BPE."""
    from embeddings.hf_clip import check_tokenizer, to_transformers_text

    encoder = sampler.text.encoder()
    try:
        check_tokenizer(encoder)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    return to_transformers_text(encoder.model), int(encoder.model.positional_embedding.shape[0])


def _check_prior(sampler, prior_dir: Path, context: int) -> None:
    config = sampler.config
    if not config.raw:
        raise ConfigError(
            f"the prior in {prior_dir} reads unit CLIP vectors (prior.clip_space unit); diffusers' pipelines feed "
            "raw text embeddings and read raw image embeddings, so it would sample from the wrong inputs: retrain "
            "it with prior.clip_space: raw (as configs/prior/small.yaml does) or fine-tune a published prior (init_from)"
        )
    if not config.text_token_width or config.max_text_tokens != context:
        raise ConfigError(
            f"the prior in {prior_dir} must read the CLIP's {context} per-token encodings (text_tokens: clip, "
            f"max_text_tokens {context}): the pipeline passes them all"
        )


def export_prior_pipeline(prior_dir: str | Path, out: str | Path) -> Path:
    """Write the exported prior at `prior_dir` (models/<name>/prior) as a KandinskyV22PriorPipeline folder."""
    from diffusers import KandinskyV22PriorPipeline, PriorTransformer
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from transformers import CLIPImageProcessor, CLIPTokenizer

    from embeddings.hf_clip import to_transformers_vision, write_tokenizer
    from training.diffusion import unclip_scheduler
    from training.export import load_prior
    from training.published import save_prior_diffusers

    prior_dir, out = Path(prior_dir), Path(out)
    sampler = load_prior(prior_dir)
    text_encoder, context = _text_parts(sampler, prior_dir)
    _check_prior(sampler, prior_dir, context)
    model = sampler.text.encoder().model
    try:
        image_encoder = to_transformers_vision(model)
    except ValueError as err:
        raise ConfigError(f"KandinskyV22PriorPipeline needs the CLIP's image encoder: {err}") from err
    size = image_encoder.config.image_size
    save_prior_diffusers(sampler.net, out / "prior")
    pipeline = KandinskyV22PriorPipeline(
        prior=PriorTransformer.from_pretrained(out / "prior"),
        image_encoder=image_encoder,
        text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(write_tokenizer(out / "tokenizer", context)),
        scheduler=unclip_scheduler("fixed_small_log", "sample", clip_sample=False),
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": size},
            crop_size={"height": size, "width": size},
            resample=3,  # bicubic, as open_clip's transform
            image_mean=list(getattr(model.visual, "image_mean", None) or OPENAI_DATASET_MEAN),
            image_std=list(getattr(model.visual, "image_std", None) or OPENAI_DATASET_STD),
        ),
    )
    pipeline.save_pretrained(out)
    return out


def _check_decoder(sampler, where: Path) -> None:
    config = sampler.config
    if config.layout != "karlo" or sampler.condition != "image":
        raise ConfigError(
            f"the decoder in {where} is not Karlo's (decoder.layout {config.layout!r}, condition "
            f"{sampler.condition!r}): UnCLIPPipeline holds a UnCLIPTextProjModel and a UNet2DConditionModel reading "
            "the CLIP image embedding (decoder.layout: karlo, condition: image)"
        )
    if sampler.prediction_type not in UNCLIP_PREDICTIONS:
        raise ConfigError(
            f"the decoder in {where} predicts {sampler.prediction_type}; UnCLIPScheduler takes ε or x_0 "
            "(prediction_type: epsilon or sample)"
        )
    if sampler.text.mode != "clip":
        raise ConfigError(f"the decoder in {where} must read the caption's token encodings (text_tokens: clip)")


def _check_upsampler(sampler, where: Path, decoder_size: int) -> None:
    config = sampler.config
    if config.dim:
        raise ConfigError(
            f"the upsampler in {where} also reads the CLIP image embedding (upsampler.dim {config.dim}); "
            "UnCLIPPipeline's super-resolution call passes the upsampled image only: train one with dim 0"
        )
    if sampler.prediction_type not in UNCLIP_PREDICTIONS:
        raise ConfigError(
            f"the upsampler in {where} predicts {sampler.prediction_type}; UnCLIPScheduler takes ε or x_0 (epsilon or "
            "sample)"
        )
    if config.image_size != decoder_size * config.factor:
        raise ConfigError(
            f"the upsampler in {where} makes {config.image_size} px from {config.image_size // config.factor} px, and "
            f"the decoder draws {decoder_size} px"
        )


def export_unclip_pipeline(models: str | Path, out: str | Path) -> Path:
    """Write models/<name>/ (prior/, decoder/, upsampler/) as an UnCLIPPipeline folder at `out`."""
    from diffusers import PriorTransformer, UNet2DModel
    from diffusers.pipelines.deprecated.unclip import UnCLIPPipeline
    from transformers import CLIPTokenizer

    from embeddings.hf_clip import write_tokenizer
    from training.diffusion import unclip_scheduler
    from training.export import load_decoder, load_prior, load_upsampler
    from training.published import save_prior_diffusers

    models, out = Path(models), Path(out)
    prior = load_prior(models / "prior")
    checksum = prior.text.clip.get("checksum")
    decoder = load_decoder(models / "decoder", checksum, prior.text.encoder())
    upsampler = load_upsampler(models / "upsampler", checksum)
    text_encoder, context = _text_parts(prior, models / "prior")
    _check_prior(prior, models / "prior", context)
    _check_decoder(decoder, models / "decoder")
    _check_upsampler(upsampler, models / "upsampler", decoder.config.image_size)
    save_prior_diffusers(prior.net, out / "prior")
    upsampler.net.unet.save_pretrained(out / "super_res_first", safe_serialization=True)
    learned = decoder.config.learned_variance
    pipeline = UnCLIPPipeline(
        prior=PriorTransformer.from_pretrained(out / "prior"),
        decoder=decoder.net.unet,
        text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(write_tokenizer(out / "tokenizer", context)),
        text_proj=decoder.net.text_proj,
        super_res_first=upsampler.net.unet,
        super_res_last=UNet2DModel.from_pretrained(out / "super_res_first"),  # the one upsampler at both stages
        prior_scheduler=unclip_scheduler("fixed_small_log", "sample", clip_sample=False),
        decoder_scheduler=unclip_scheduler("learned_range" if learned else "fixed_small_log", decoder.prediction_type),
        super_res_scheduler=unclip_scheduler("fixed_small_log", upsampler.prediction_type),
    )
    pipeline.save_pretrained(out)
    index = json.loads((out / "model_index.json").read_text())
    (out / "model_index.json").write_text(json.dumps(dict(index, text_proj=TEXT_PROJ), indent=2) + "\n")
    return out


def export_diffusers(models: str | Path, out: str | Path) -> list[str]:
    """Export models/<name>/ to `out`: an UnCLIPPipeline folder where it holds a prior, decoder and upsampler, else
    a KandinskyV22PriorPipeline folder of its prior; returns a line saying what was written."""
    models, out = Path(models), Path(out)
    if not (models / "prior" / "config.json").is_file():
        raise FileNotFoundError(f"no exported prior in {models}/prior: run `make train-prior` first")
    stages = [s for s in ("decoder", "upsampler") if (models / s / "config.json").is_file()]
    why = f"no {' or '.join(sorted({'decoder', 'upsampler'} - set(stages)))} in {models}"
    if stages == ["decoder", "upsampler"]:
        try:
            export_unclip_pipeline(models, out)
            return [f"prior, decoder, upsampler → {out}/ (UnCLIPPipeline.from_pretrained('{out}'))"]
        except ConfigError as err:  # the prior may still export alone (checked again below)
            why = str(err)
    export_prior_pipeline(models / "prior", out)
    return [f"prior → {out}/ (KandinskyV22PriorPipeline.from_pretrained('{out}')); no UnCLIPPipeline: {why}"]
