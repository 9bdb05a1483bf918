"""`make export-diffusers`: our exports as folders that diffusers' pipelines load and run offline.

The prior exports as a `KandinskyV22PriorPipeline` folder (`model_index.json`, `prior/` our
PriorTransformer as it is, `text_encoder/` and `image_encoder/` converted from the open_clip CLIP the
prior was trained against, `tokenizer/` written from open_clip's BPE vocabulary, `image_processor/`
with the CLIP's resize and normalisation, `scheduler/` an `UnCLIPScheduler` predicting x_0 without
clipping, as ours samples). What the pipeline does that ours does not: it draws all noise from one
generator, spaces its timesteps its own way (ancestral steps with the fixed small variance where ours
runs DDIM) and returns the last sample rather than the best of N; the networks and their inputs are
the same (tested stage by stage).

What cannot export, and why (each an error that says so):
- a prior trained from scratch reads unit CLIP vectors, while the pipelines feed raw text embeddings
  and take raw image embeddings: only a prior in raw CLIP space (`init_from` a published prior)
  computes the right thing under them;
- the pipeline needs the CLIP's image tower in transformers' ViT form: a ResNet tower (the default
  CLIP's) has none;
- the decoder and upsamplers (Karlo's `UnCLIPPipeline`): the pipeline feeds its decoder raw CLIP vectors
  and our decoders are trained on unit ones (and the demo's default decoder is not yet in Karlo's layout,
  `decoder.layout: karlo`), so they are not exported yet.
"""

from __future__ import annotations

from pathlib import Path

from embeddings.config import ConfigError


def export_prior_pipeline(prior_dir: str | Path, out: str | Path) -> Path:
    """Write the exported prior at `prior_dir` (models/<name>/prior) as a KandinskyV22PriorPipeline folder."""
    from diffusers import KandinskyV22PriorPipeline, PriorTransformer, UnCLIPScheduler
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from transformers import CLIPImageProcessor, CLIPTokenizer

    from embeddings.hf_clip import check_tokenizer, to_transformers_text, to_transformers_vision, write_tokenizer
    from training.export import load_prior
    from training.published import save_prior_diffusers

    prior_dir, out = Path(prior_dir), Path(out)
    sampler = load_prior(prior_dir)
    config = sampler.config
    if not config.raw:
        raise ConfigError(
            f"the prior in {prior_dir} was trained from scratch on unit CLIP vectors; diffusers' prior pipelines "
            "feed it raw text embeddings and read raw image embeddings, so it would sample from the wrong inputs. "
            "A prior fine-tuned from published weights (init_from) reads raw vectors and exports"
        )
    model = sampler.text.encoder().model
    try:
        check_tokenizer(sampler.text.encoder())
    except ValueError as err:
        raise ConfigError(str(err)) from err
    context = int(model.positional_embedding.shape[0])
    if not config.text_token_width or config.max_text_tokens != context:
        raise ConfigError(
            f"the prior in {prior_dir} must read the CLIP's {context} per-token encodings (text_tokens: clip, "
            f"max_text_tokens {context}): the pipeline passes them all"
        )
    try:
        image_encoder = to_transformers_vision(model)
    except ValueError as err:
        raise ConfigError(f"KandinskyV22PriorPipeline needs the CLIP's image encoder: {err}") from err
    size = image_encoder.config.image_size
    save_prior_diffusers(sampler.net, out / "prior")
    tokenizer = CLIPTokenizer.from_pretrained(write_tokenizer(out / "tokenizer", context))
    pipeline = KandinskyV22PriorPipeline(
        prior=PriorTransformer.from_pretrained(out / "prior"),
        image_encoder=image_encoder,
        text_encoder=to_transformers_text(model),
        tokenizer=tokenizer,
        scheduler=UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="sample", clip_sample=False),
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


def export_diffusers(models: str | Path, out: str | Path) -> list[str]:
    """Export what of models/<name>/ diffusers can load to `out`; returns a line per component."""
    models, out = Path(models), Path(out)
    if not (models / "prior" / "config.json").is_file():
        raise FileNotFoundError(f"no exported prior in {models}/prior: run `make train-prior` first")
    export_prior_pipeline(models / "prior", out)
    lines = [f"prior → {out}/ (KandinskyV22PriorPipeline.from_pretrained('{out}'))"]
    if (models / "decoder" / "config.json").is_file():
        lines.append(
            "decoder, upsampler: not exported: UnCLIPPipeline feeds its decoder raw CLIP vectors, and ours are trained "
            "on unit ones"
        )
    return lines
