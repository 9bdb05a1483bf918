"""The published unCLIP layouts that diffusers loads (Karlo's UnCLIPPipeline, Kandinsky 2.2's prior
pipeline), exercised offline through tiny random-weight instances (tests/diffusers_tiny.py)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from training.diffusers_export import TEXT_PROJ

from .diffusers_tiny import CLIP_DIM, tiny_kandinsky_prior_pipeline, tiny_unclip_pipeline


def test_the_pinned_transformers_runs_diffusers_unclip_and_kandinsky_pipelines_offline(tmp_path):
    from diffusers import KandinskyV22PriorPipeline
    from diffusers.pipelines.deprecated.unclip import UnCLIPPipeline

    steps = dict(prior_num_inference_steps=2, decoder_num_inference_steps=2, super_res_num_inference_steps=2)
    pipeline = tiny_unclip_pipeline(tmp_path / "karlo")
    images = pipeline("a red circle", generator=torch.Generator().manual_seed(0), output_type="np", **steps).images
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all() and images.std() > 0
    pipeline.save_pretrained(tmp_path / "karlo" / "saved")
    index = json.loads((tmp_path / "karlo" / "saved" / "model_index.json").read_text())
    assert index["text_proj"] == ["diffusers", "UnCLIPTextProjModel"]  # what 0.42.1 writes, and cannot read
    index["text_proj"] = TEXT_PROJ
    (tmp_path / "karlo" / "saved" / "model_index.json").write_text(json.dumps(index))
    loaded = UnCLIPPipeline.from_pretrained(tmp_path / "karlo" / "saved")
    again = loaded("a red circle", generator=torch.Generator().manual_seed(0), output_type="np", **steps).images
    np.testing.assert_allclose(again, images, atol=1e-5)

    prior = tiny_kandinsky_prior_pipeline(tmp_path / "kandinsky")
    embeds = prior("a blue square", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).image_embeds
    prior.save_pretrained(tmp_path / "kandinsky" / "saved")
    loaded = KandinskyV22PriorPipeline.from_pretrained(tmp_path / "kandinsky" / "saved")
    again = loaded("a blue square", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).image_embeds
    assert embeds.shape == (1, 32) and torch.allclose(again, embeds, atol=1e-6)


LAYOUTS = {
    "defaults": {},  # PriorTransformer's defaults (silu timestep MLP, no input norms), as Karlo's prior has them
    "switches": dict(  # the layout switches PriorTransformer offers; a folder's config.json says which it uses
        time_embed_act_fn="gelu", norm_in_type="layer", embedding_proj_norm_type="layer", encoder_hid_proj_type="linear"
    ),
}


def published_prior(folder, layout: str, **sizes):
    """A tiny random-weight PriorTransformer in a published layout, saved as the prior/ of a pipeline folder,
    with clip statistics of raw vectors (not the unit space's 0 and 1/√D)."""
    from .diffusers_tiny import tiny_prior

    reference = tiny_prior(**LAYOUTS[layout], **sizes)
    with torch.no_grad():
        for p in reference.parameters():  # every tensor random, so a mismatch anywhere shows
            p.add_(0.05 * torch.randn_like(p))
        reference.clip_mean.copy_(torch.randn_like(reference.clip_mean))
        reference.clip_std.copy_(torch.rand_like(reference.clip_std) + 0.5)
    reference.save_pretrained(folder / "prior")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "UnCLIPPipeline"}))
    return reference


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_init_from_a_published_prior_computes_what_diffusers_computes(layout, tmp_path):
    """Our prior built from the folder's sizes and filled from its weights: the same x_0 as diffusers'
    PriorTransformer on the same inputs (token encodings shorter than the slots are padded and masked),
    and the same raw-space statistics."""
    from training.prior_net import DiffusionPrior, PriorConfig
    from training.published import checked_prior_sizes, load_published_prior

    reference = published_prior(tmp_path, layout)
    sizes = checked_prior_sizes(tmp_path, None)
    assert sizes["clip_space"] == "raw" and sizes["text_token_width"] == sizes["dim"] == CLIP_DIM
    net = DiffusionPrior(PriorConfig(**sizes)).eval()
    load_published_prior(net, tmp_path)
    g = torch.Generator().manual_seed(0)
    x_t, z_t = torch.randn(3, CLIP_DIM, generator=g), torch.randn(3, CLIP_DIM, generator=g)
    tokens, t = torch.randn(3, 16, CLIP_DIM, generator=g), torch.tensor([0, 400, 999])
    mask = torch.arange(16)[None] < torch.tensor([[16], [5], [2]])
    with torch.no_grad():
        expected = reference(x_t, t, z_t, encoder_hidden_states=tokens, attention_mask=mask).predicted_image_embedding
        torch.testing.assert_close(net(x_t, t, z_t, tokens, mask), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(net(x_t, t, z_t, tokens[:, :5], mask[:, :5])[1:], expected[1:], atol=1e-5, rtol=0)
        torch.testing.assert_close(net.denormalise(x_t), reference.post_process_latents(x_t))
        torch.testing.assert_close(net.denormalise(net.normalise(z_t)), z_t, atol=1e-5, rtol=0)


def _edit_weights(folder, edit):
    from safetensors.torch import load_file, save_file

    path = folder / "prior" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path))


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda s: s.__setitem__("proj_inn.weight", s.pop("proj_in.weight")),
            "missing proj_in.weight; unexpected proj_inn.weight",
        ),
        (
            lambda s: s.__setitem__("clip_std", s["clip_std"][:, :-1]),
            "clip_std has shape (1, 31), the network holds (1, 32)",
        ),
        (lambda s: s.pop("prd_embedding"), "missing prd_embedding"),
    ],
)
def test_a_published_prior_with_a_renamed_reshaped_or_missing_tensor_is_refused_by_name(tmp_path, edit, message):
    from embeddings.config import ConfigError
    from training.prior_net import DiffusionPrior, PriorConfig
    from training.published import checked_prior_sizes, load_published_prior

    published_prior(tmp_path, "defaults")
    _edit_weights(tmp_path, edit)
    net = DiffusionPrior(PriorConfig(**checked_prior_sizes(tmp_path, None)))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_published_prior(net, tmp_path)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())  # nothing half-loaded


def test_config_sizes_that_contradict_the_published_prior_are_refused(tmp_path):
    from embeddings.config import ConfigError
    from training.published import checked_prior_sizes

    published_prior(tmp_path, "defaults")
    assert checked_prior_sizes(tmp_path, {"dim": CLIP_DIM, "dropout": 0.1})["dropout"] == 0.1
    with pytest.raises(ConfigError, match=r"prior.depth is 4 but the prior at init_from .* has 1"):
        checked_prior_sizes(tmp_path, {"depth": 4})
    config = json.loads((tmp_path / "prior" / "config.json").read_text())
    (tmp_path / "prior" / "config.json").write_text(json.dumps(dict(config, added_emb_type=None)))
    with pytest.raises(ConfigError, match="added_emb_type = None"):
        checked_prior_sizes(tmp_path, None)
    with pytest.raises(ConfigError, match="not a diffusers folder"):
        checked_prior_sizes(tmp_path / "prior" / "nothing", None)


def _raw_prior_export(folder, clip_dir, layout: str = "switches"):
    """models/<name>/prior/ of a prior in raw CLIP space (a tiny published one, loaded by init_from) trained
    against the tiny test CLIP (32-d, 32 tokens)."""
    from training.conditioning import load_clip
    from training.export import save_export
    from training.prior_net import DiffusionPrior, PriorConfig
    from training.published import checked_prior_sizes, load_published_prior

    published_prior(folder / "published", layout, num_embeddings=32)
    sizes = checked_prior_sizes(folder / "published", None)
    net = DiffusionPrior(PriorConfig(**sizes)).eval()
    load_published_prior(net, folder / "published")
    encoder = load_clip({"model": str(clip_dir)})
    record = {"model": str(clip_dir), "checksum": encoder.checksum}
    hparams = {"text_tokens": "clip", "sampling": {"steps": 4, "guidance_scale": 1.0, "candidates": 1}}
    return save_export(folder / "models" / "prior", "prior", net, {"prior": sizes, "hparams": hparams}, record)


def test_a_raw_space_prior_exports_to_a_kandinsky_prior_pipeline_that_runs_offline(tiny_clip_dir, tmp_path):
    """make export-diffusers on a prior fine-tuned from published weights: KandinskyV22PriorPipeline loads the
    folder and samples; stage by stage, the pipeline's text encoder and tokenizer give the prior the inputs ours
    gives it (raw z_t, token encodings on the real tokens), so the prior's output is ours."""
    from diffusers import KandinskyV22PriorPipeline

    from training.diffusers_export import export_diffusers
    from training.export import load_prior

    prior_dir = _raw_prior_export(tmp_path, tiny_clip_dir)
    lines = export_diffusers(prior_dir.parent, tmp_path / "out")
    assert "KandinskyV22PriorPipeline" in lines[0]
    pipeline = KandinskyV22PriorPipeline.from_pretrained(tmp_path / "out")
    out = pipeline("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert out.image_embeds.shape == (1, CLIP_DIM) and torch.isfinite(out.image_embeds).all()

    sampler = load_prior(prior_dir)
    captions = ["a red circle, on black!", "a small blue square"]
    unit = sampler.text.encoder().encode_texts(captions)
    z_t = unit * sampler.text.norms(captions, "cpu")[:, None]  # what our sampler feeds a raw-space prior
    tokens, mask = sampler.text.tokens(captions, "cpu")
    ids = pipeline.tokenizer(captions, padding="max_length", max_length=32, truncation=True, return_tensors="pt")
    x_t, t = torch.randn(2, CLIP_DIM), torch.tensor([10, 900])
    with torch.no_grad():
        theirs = pipeline.text_encoder(input_ids=ids.input_ids, attention_mask=ids.attention_mask)
        torch.testing.assert_close(theirs.text_embeds, z_t, atol=1e-5, rtol=0)
        expected = sampler.net(x_t, t, z_t, tokens, mask)
        got = pipeline.prior(
            x_t,
            t,
            proj_embedding=theirs.text_embeds,
            encoder_hidden_states=theirs.last_hidden_state,
            attention_mask=ids.attention_mask.bool(),
        ).predicted_image_embedding
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_what_cannot_export_to_diffusers_says_why(tiny_clip_dir, tmp_path):
    from embeddings.config import ConfigError
    from embeddings.hf_clip import to_transformers_vision
    from training.conditioning import load_clip
    from training.diffusers_export import export_prior_pipeline
    from training.export import save_export
    from training.prior_net import DiffusionPrior, PriorConfig

    from .conftest import REPO

    sizes = PriorConfig(dim=32, width=16, depth=1, heads=2, text_token_width=32, max_text_tokens=32).to_dict()
    encoder = load_clip({"model": str(tiny_clip_dir)})
    folder = save_export(
        tmp_path / "scratch",
        "prior",
        DiffusionPrior(PriorConfig(**sizes)),
        {"prior": sizes, "hparams": {"text_tokens": "clip", "sampling": {}}},
        {"model": str(tiny_clip_dir), "checksum": encoder.checksum},
    )
    with pytest.raises(ConfigError, match=r"reads unit CLIP vectors \(prior.clip_space unit\)"):
        export_prior_pipeline(folder, tmp_path / "out")
    default_clip = load_clip({"model": str(REPO / "models" / "synthetic" / "clip")})
    with pytest.raises(ValueError, match="image tower is a ModifiedResNet"):
        to_transformers_vision(default_clip.model)


def test_a_karlo_decoder_and_text_projection_load_into_ours_and_compute_the_pipelines_decoder_call(tmp_path):
    """Our KarloDecoder built from a Karlo folder's decoder/ and text_proj/ configs and filled from their weights
    (strict): the pipeline's decoder call (text projection, 4 extra tokens before the masked text encodings,
    the additive time embedding) gives the same 6 channels; a reshaped tensor is refused by name."""
    from embeddings.config import ConfigError
    from training.decoder_net import DecoderConfig, KarloDecoder
    from training.published import decoder_sizes, load_published_decoder

    pipeline = tiny_unclip_pipeline(tmp_path / "karlo")
    with torch.no_grad():
        pipeline.text_proj.learned_classifier_free_guidance_embeddings.normal_()
    pipeline.save_pretrained(tmp_path / "saved")
    sizes = decoder_sizes(tmp_path / "saved")
    assert sizes["layout"] == "karlo" and sizes["learned_variance"] and sizes["head_width"] == 8
    net = KarloDecoder(DecoderConfig(**sizes)).eval()
    load_published_decoder(net, tmp_path / "saved")
    torch.testing.assert_close(net.null_embedding(), pipeline.text_proj.learned_classifier_free_guidance_embeddings)
    g = torch.Generator().manual_seed(0)
    x_t, t = torch.randn(2, 3, 8, 8, generator=g), torch.tensor([5, 700])
    z_i, z_t = torch.randn(2, CLIP_DIM, generator=g), torch.randn(2, CLIP_DIM, generator=g)
    tokens, mask = torch.randn(2, 16, CLIP_DIM, generator=g), torch.arange(16)[None] < torch.tensor([[16], [3]])
    with torch.no_grad():
        context, time = pipeline.text_proj(
            image_embeddings=z_i,
            prompt_embeds=z_t,
            text_encoder_hidden_states=tokens,
            do_classifier_free_guidance=False,
        )
        padded = torch.nn.functional.pad(mask, (4, 0), value=True)
        expected = pipeline.decoder(x_t, t, encoder_hidden_states=context, class_labels=time, attention_mask=padded)
        torch.testing.assert_close(net(x_t, t, z_i, tokens, mask, z_t=z_t), expected.sample, atol=1e-5, rtol=0)
    from safetensors.torch import load_file, save_file

    weights = tmp_path / "saved" / "text_proj" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    state["embedding_proj.weight"] = state["embedding_proj.weight"][:, :-1].contiguous()
    save_file(state, str(weights))
    with pytest.raises(ConfigError, match=r"embedding_proj.weight has shape \(64, 31\)"):
        load_published_decoder(KarloDecoder(DecoderConfig(**sizes)), tmp_path / "saved")


def test_init_from_a_karlo_super_resolution_unet_computes_what_it_computes(tmp_path):
    """An upsampler started from Karlo's super_res_first: its UNet2DModel config kept whole, its weights loaded
    strictly; given the upsampled image, our forward is the published UNet's on [x_t, image]; sizes in the
    config that contradict it, a conditioning embedding, or a v-prediction are refused."""
    from embeddings.config import ConfigError
    from training.decoder import UpsamplerModule
    from training.decoder_net import Upsampler, UpsamplerConfig
    from training.published import load_published_upsampler, upsampler_sizes

    pipeline = tiny_unclip_pipeline(tmp_path / "karlo")
    pipeline.save_pretrained(tmp_path / "saved")
    sizes = upsampler_sizes(tmp_path / "saved", {"factor": 4, "dim": 0})
    assert sizes["image_size"] == 32 and sizes["unet"]["down_block_types"][0] == "ResnetDownsampleBlock2D"
    net = Upsampler(UpsamplerConfig(**sizes)).eval()
    load_published_upsampler(net, tmp_path / "saved")
    g = torch.Generator().manual_seed(0)
    x_t, image, t = (
        torch.randn(2, 3, 32, 32, generator=g),
        torch.rand(2, 3, 32, 32, generator=g) * 2 - 1,
        torch.tensor([3, 600]),
    )
    with torch.no_grad():
        expected = pipeline.super_res_first(torch.cat([x_t, image], dim=1), t).sample
        torch.testing.assert_close(net(x_t, t, image), expected, atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match="upsampler.channels"):
        upsampler_sizes(tmp_path / "saved", {"channels": [8, 16]})
    with pytest.raises(ValueError, match="nothing else"):
        Upsampler(UpsamplerConfig(**dict(sizes, dim=32)))
    with pytest.raises(ValueError, match="predict ε"):
        UpsamplerModule(sizes, init_from=str(tmp_path / "saved"), prediction_type="v_prediction")
    module = UpsamplerModule(sizes, init_from=str(tmp_path / "saved"), prediction_type="epsilon")
    state = pipeline.super_res_first.state_dict()
    assert all(torch.equal(v, module.ema.unet.state_dict()[k]) for k, v in state.items())


def _our_unclip_models(folder, clip_dir, *, upsampler_dim: int = 0, prediction_type: str = "epsilon"):
    """models/<name>/ in the exportable form (the demo's configs/*/small.yaml and upsampler-small.yaml), at tiny
    sizes with random weights, against the tiny test CLIP (32-d, 32 tokens): a raw-space prior reading token
    encodings through Kandinsky 2.2's input LayerNorms, a Karlo-layout decoder with a learned variance, an
    upsampler (8 → 32 px); decoder and upsampler predict `prediction_type` (ε or x_0)."""
    from training.conditioning import load_clip
    from training.decoder_net import DecoderConfig, KarloDecoder, Upsampler, UpsamplerConfig
    from training.export import save_export
    from training.prior_net import DiffusionPrior, PriorConfig

    encoder = load_clip({"model": str(clip_dir)})
    record = {"model": str(clip_dir), "checksum": encoder.checksum}
    torch.manual_seed(0)
    prior_sizes = PriorConfig(
        dim=CLIP_DIM,
        width=32,
        depth=1,
        heads=2,
        text_token_width=CLIP_DIM,
        max_text_tokens=32,
        clip_space="raw",
        norm_in_type="layer",
        embedding_proj_norm_type="layer",
    ).to_dict()
    decoder_sizes = DecoderConfig(
        image_size=8,
        dim=CLIP_DIM,
        channels=[16, 32],
        layers_per_block=1,
        head_width=16,
        context_width=32,
        text_token_width=CLIP_DIM,
        norm_groups=8,
        layout="karlo",
        learned_variance=True,
    ).to_dict()
    upsampler_sizes = UpsamplerConfig(image_size=32, dim=upsampler_dim, channels=[16, 32], norm_groups=8).to_dict()
    prior = DiffusionPrior(PriorConfig(**prior_sizes))
    prior.set_statistics(0.1 * torch.randn(CLIP_DIM), torch.rand(CLIP_DIM) + 0.5)
    nets = {
        "prior": (prior, {"text_tokens": "clip"}),
        "decoder": (
            KarloDecoder(DecoderConfig(**decoder_sizes)),
            {"text_tokens": "clip", "prediction_type": prediction_type, "condition": "image"},
        ),
        "upsampler": (Upsampler(UpsamplerConfig(**upsampler_sizes)), {"prediction_type": prediction_type}),
    }
    sizes = {"prior": prior_sizes, "decoder": decoder_sizes, "upsampler": upsampler_sizes}
    for kind, (net, hparams) in nets.items():
        with torch.no_grad():  # every trainable tensor random (zero-initialised ones too), so a mismatch shows
            for p in net.parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn_like(p))
        save_export(folder / kind, kind, net, {kind: sizes[kind], "hparams": dict(hparams, sampling={})}, record)
    return folder


@pytest.mark.parametrize("prediction_type", ["sample", "epsilon"])
def test_the_exportable_form_exports_to_an_unclip_pipeline_that_runs_and_computes_ours_stage_by_stage(
    tiny_clip_dir, tmp_path, prediction_type
):
    """make export-diffusers on prior/, decoder/ and upsampler/ in the exportable form: UnCLIPPipeline loads the
    folder and draws images; with the same inputs its text encoder, prior, text projection + decoder (both
    guidance halves: ours drops z_i to the learned null vector and the caption to the empty one, as the
    pipeline does) and super-resolution UNets (after the antialiased bicubic resize its call makes, written out here) compute what
    ours do."""
    import torch.nn.functional as F
    from diffusers.pipelines.deprecated.unclip import UnCLIPPipeline

    from training.diffusers_export import export_diffusers
    from training.export import load_decoder, load_prior, load_upsampler

    models = _our_unclip_models(tmp_path / "models", tiny_clip_dir, prediction_type=prediction_type)
    lines = export_diffusers(models, tmp_path / "out")
    assert "UnCLIPPipeline" in lines[0]
    assert json.loads((tmp_path / "out" / "model_index.json").read_text())["text_proj"] == TEXT_PROJ
    for stage, variance in (("decoder", "learned_range"), ("super_res", "fixed_small_log")):
        scheduler = json.loads((tmp_path / "out" / f"{stage}_scheduler" / "scheduler_config.json").read_text())
        assert (scheduler["prediction_type"], scheduler["variance_type"]) == (prediction_type, variance)
    pipeline = UnCLIPPipeline.from_pretrained(tmp_path / "out")
    steps = dict(prior_num_inference_steps=2, decoder_num_inference_steps=2, super_res_num_inference_steps=2)
    images = pipeline("a red circle", generator=torch.Generator().manual_seed(0), output_type="np", **steps).images
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all() and images.std() > 0

    prior, decoder, upsampler = (
        load_prior(models / "prior"),
        load_decoder(models / "decoder"),
        load_upsampler(models / "upsampler"),
    )
    captions = ["a red circle, on black!", "a small blue square"]
    ids = pipeline.tokenizer(
        [""] * 2 + captions, padding="max_length", max_length=32, truncation=True, return_tensors="pt"
    )
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        theirs = pipeline.text_encoder(input_ids=ids.input_ids, attention_mask=ids.attention_mask)
        ours = decoder.caption(captions, 2, "cpu")  # raw z_t, token encodings, mask
        torch.testing.assert_close(theirs.text_embeds[2:], ours.z_t, atol=1e-5, rtol=0)
        their_mask = ids.attention_mask.bool()

        x_t, t = torch.randn(2, CLIP_DIM, generator=g), torch.tensor([10, 900])
        got = pipeline.prior(
            x_t,
            t,
            proj_embedding=ours.z_t,
            encoder_hidden_states=theirs.last_hidden_state[2:],
            attention_mask=their_mask[2:],
        ).predicted_image_embedding
        torch.testing.assert_close(got, prior.net(x_t, t, ours.z_t, ours.tokens, ours.mask), atol=1e-5, rtol=0)
        torch.testing.assert_close(pipeline.prior.post_process_latents(got), prior.net.denormalise(got))

        z_i, x_t, t = (
            torch.randn(2, CLIP_DIM, generator=g) * 8,
            torch.randn(2, 3, 8, 8, generator=g),
            torch.tensor([5, 700]),
        )
        context, time = pipeline.text_proj(
            image_embeddings=z_i,
            prompt_embeds=theirs.text_embeds,
            text_encoder_hidden_states=theirs.last_hidden_state,
            do_classifier_free_guidance=True,
        )
        mask = F.pad(their_mask, (4, 0), value=True)
        got = pipeline.decoder(
            torch.cat([x_t, x_t]), torch.cat([t, t]), context, class_labels=time, attention_mask=mask
        ).sample
        empty = decoder.text.empty("cpu", raw=True).map(lambda v: v.expand(2, *v.shape[1:]))
        null = decoder.net.null_embedding().expand(2, -1)
        uncond = decoder.net(x_t, t, null, empty.tokens, empty.mask, z_t=empty.z_t)
        cond = decoder.net(x_t, t, z_i, ours.tokens, ours.mask, z_t=ours.z_t)
        torch.testing.assert_close(got, torch.cat([uncond, cond]), atol=1e-4, rtol=0)

        low, x_t = torch.rand(2, 3, 8, 8, generator=g) * 2 - 1, torch.randn(2, 3, 32, 32, generator=g)
        upscaled = F.interpolate(low, size=[32, 32], mode="bicubic", align_corners=False, antialias=True)
        expected = upsampler.net(x_t, t, low)
        for stage in (pipeline.super_res_first, pipeline.super_res_last):
            torch.testing.assert_close(stage(torch.cat([x_t, upscaled], dim=1), t).sample, expected, atol=1e-4, rtol=0)


def test_models_that_unclip_pipeline_cannot_run_are_refused_with_the_reason(tiny_clip_dir, tmp_path):
    from embeddings.config import ConfigError
    from training.diffusers_export import export_diffusers, export_unclip_pipeline

    models = _our_unclip_models(tmp_path / "models", tiny_clip_dir, upsampler_dim=CLIP_DIM)
    with pytest.raises(ConfigError, match="passes the upsampled image only"):
        export_unclip_pipeline(models, tmp_path / "out")
    (line,) = export_diffusers(models, tmp_path / "prior-only")  # the prior still exports alone, and says why
    assert "KandinskyV22PriorPipeline" in line and "no UnCLIPPipeline: " in line and "upsampled image only" in line
    assert (tmp_path / "prior-only" / "image_encoder").is_dir()
    config = json.loads((models / "decoder" / "config.json").read_text())
    config["hparams"]["prediction_type"] = "v_prediction"
    (models / "decoder" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="UnCLIPScheduler takes ε or x_0"):
        export_unclip_pipeline(models, tmp_path / "out")
