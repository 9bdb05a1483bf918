"""Tiny random-weight instances of the published unCLIP layouts (no weights can be downloaded here):
Karlo's UnCLIPPipeline (PriorTransformer, a UNet2DConditionModel decoder with UnCLIPTextProjModel, two
UNet2DModel super-resolution stages, a transformers CLIP text tower) and Kandinsky 2.2's prior pipeline.
Sizes are the smallest that every block accepts; the vocabulary is a handful of words."""

from __future__ import annotations

import json
from pathlib import Path

import torch

CLIP_DIM = 32  # CLIP embedding width = text width, as in Karlo (ViT-L/14: 768 both)
WORDS = ["a", "red", "blue", "circle", "square", "small", "large", "on", "black", "white"]


def tiny_tokenizer(folder: Path):
    """A CLIPTokenizer over a few whole words (each word plus its end-of-word form), written to `folder`."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    letters = sorted({c for w in WORDS for c in w})
    tokens = ["<|startoftext|>", "<|endoftext|>", "!", *letters, *(c + "</w>" for c in letters)]
    merges = []
    for word in WORDS:  # merge a word letter by letter: w o r d</w> → wo r d</w> → ... → word</w>
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            merges.append(f"{parts[0]} {parts[1]}")
            parts = [parts[0] + parts[1], *parts[2:]]
            tokens.append(parts[0])
    tokens = list(dict.fromkeys(tokens))
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)


def tiny_text_encoder(vocab_size: int):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=CLIP_DIM,
        projection_dim=CLIP_DIM,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=16,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return CLIPTextModelWithProjection(config).eval()


def tiny_prior(**options):
    """A PriorTransformer over 16 text tokens with the `prd` query token; `options`: other layout switches."""
    from diffusers import PriorTransformer

    torch.manual_seed(1)
    sizes = dict(num_attention_heads=2, attention_head_dim=8, num_layers=1, embedding_dim=CLIP_DIM, num_embeddings=16)
    return PriorTransformer(**{**sizes, **options}).eval()


def tiny_unclip_pipeline(folder: Path):
    """Karlo's layout at toy size: every component UnCLIPPipeline loads."""
    from diffusers import UNet2DConditionModel, UNet2DModel, UnCLIPScheduler
    from diffusers.pipelines.deprecated.unclip import UnCLIPPipeline, UnCLIPTextProjModel

    tokenizer = tiny_tokenizer(folder / "tokenizer_files")
    text_encoder = tiny_text_encoder(len(tokenizer))
    channels = (16, 32)
    torch.manual_seed(2)
    decoder = UNet2DConditionModel(
        sample_size=8,
        in_channels=3,
        out_channels=6,  # ε and the learned variance (Karlo's hybrid loss)
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        block_out_channels=channels,
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=CLIP_DIM,
        attention_head_dim=8,
        resnet_time_scale_shift="scale_shift",
        class_embed_type="identity",
    ).eval()
    text_proj = UnCLIPTextProjModel(
        clip_extra_context_tokens=4,
        clip_embeddings_dim=CLIP_DIM,
        time_embed_dim=4 * channels[0],
        cross_attention_dim=CLIP_DIM,
    ).eval()

    def super_res(seed: int):
        torch.manual_seed(seed)
        return UNet2DModel(
            sample_size=32,
            in_channels=6,
            out_channels=3,
            down_block_types=("ResnetDownsampleBlock2D", "ResnetDownsampleBlock2D"),
            up_block_types=("ResnetUpsampleBlock2D", "ResnetUpsampleBlock2D"),
            block_out_channels=channels,
            layers_per_block=1,
            norm_num_groups=8,
            resnet_time_scale_shift="scale_shift",
        ).eval()

    return UnCLIPPipeline(
        prior=tiny_prior(),
        decoder=decoder,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_proj=text_proj,
        super_res_first=super_res(3),
        super_res_last=super_res(4),
        prior_scheduler=UnCLIPScheduler(
            variance_type="fixed_small_log", prediction_type="sample", clip_sample_range=5.0
        ),
        decoder_scheduler=UnCLIPScheduler(variance_type="learned_range", prediction_type="epsilon"),
        super_res_scheduler=UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="epsilon"),
    )


def tiny_kandinsky_prior_pipeline(folder: Path):
    """Kandinsky 2.2's prior pipeline at toy size (a CLIP ViT image tower beside the text tower)."""
    from diffusers import KandinskyV22PriorPipeline, UnCLIPScheduler
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    tokenizer = tiny_tokenizer(folder / "tokenizer_files")
    torch.manual_seed(5)
    vision = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=CLIP_DIM,
            projection_dim=CLIP_DIM,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            image_size=32,
            patch_size=8,
        )
    ).eval()
    processor = CLIPImageProcessor(crop_size=32, size=32)
    return KandinskyV22PriorPipeline(
        prior=tiny_prior(),
        image_encoder=vision,
        text_encoder=tiny_text_encoder(len(tokenizer)),
        tokenizer=tokenizer,
        scheduler=UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="sample", clip_sample_range=10.0),
        image_processor=processor,
    )
