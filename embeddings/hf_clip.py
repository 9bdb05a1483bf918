"""open_clip's towers and tokenizer as transformers' `CLIPTextModelWithProjection`,
`CLIPVisionModelWithProjection` (ViT image towers only) and `CLIPTokenizer`, the form diffusers' unCLIP
and Kandinsky pipelines load.

The weights are renamed, and attention's fused input projection split into q, k and v; every tensor of
the tower is mapped or the conversion stops naming the one it cannot place. The tokenizer files
(vocab.json, merges.txt) are written from open_clip's own BPE vocabulary, so nothing is downloaded.
What differs, and why it does not matter where it does not:
- Padding: open_clip pads with id 0, which is the token "!"; a transformers tokenizer whose pad token
  is "!" would also read every "!" in a caption as padding, so the files pad with the end token
  (49407), as OpenAI's and Karlo's tokenizers do. The text tower is causal and pools at the first end
  token, so the pooled embedding and the encodings of real tokens are the same (tested); padding
  positions are masked by the pipelines.
- Cleaning: open_clip's tokenizer repairs mojibake (ftfy) and unescapes HTML entities (`&amp;` → `&`)
  before splitting, which the transformers tokenizer does not, so a caption with HTML entities or
  broken encodings can tokenise differently (tested the same: plain text, punctuation, accents, CJK,
  over-long captions).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SPECIAL = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}  # open_clip → transformers
PAD = "<|endoftext|>"  # not open_clip's id 0 ("!"): see the module's docstring


def _activation(tower) -> str:
    """transformers' name of the MLP activation of an open_clip tower (the CLIP, or its `visual`)."""
    from open_clip.transformer import QuickGELU

    gelu = tower.transformer.resblocks[0].mlp.gelu
    if isinstance(gelu, QuickGELU):
        return "quick_gelu"
    if isinstance(gelu, torch.nn.GELU) and gelu.approximate == "none":
        return "gelu"
    raise ValueError(f"the tower's activation {gelu} has no transformers equivalent here")


def text_config(model, eos_token_id: int = 49407):
    """The CLIPTextConfig of an open_clip CLIP's text tower."""
    from transformers import CLIPTextConfig

    if getattr(model, "text_pool_type", "argmax") != "argmax":
        raise ValueError(f"text pooling {model.text_pool_type!r}: transformers' CLIP pools at the end token only")
    width = model.ln_final.weight.shape[0]
    block = model.transformer.resblocks[0]
    projection = model.text_projection
    return CLIPTextConfig(
        vocab_size=model.token_embedding.weight.shape[0],
        hidden_size=width,
        intermediate_size=block.mlp.c_fc.weight.shape[0],
        num_hidden_layers=len(model.transformer.resblocks),
        num_attention_heads=block.attn.num_heads,
        max_position_embeddings=model.positional_embedding.shape[0],
        hidden_act=_activation(model),
        layer_norm_eps=model.ln_final.eps,
        projection_dim=(projection.weight.shape[0] if isinstance(projection, torch.nn.Linear) else projection.shape[1]),
        bos_token_id=eos_token_id - 1,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,  # as the written tokenizer pads
    )


def _map_blocks(source: dict, ours: str, theirs: str, blocks: int, take) -> None:
    """The residual attention blocks of a tower: open_clip's names under `ours`, transformers' under `theirs`."""
    for i in range(blocks):
        a, b = f"{ours}{i}.", f"{theirs}{i}."
        for name, part in zip("qkv", source[a + "attn.in_proj_weight"].chunk(3)):
            take(a + "attn.in_proj_weight", b + f"self_attn.{name}_proj.weight", part)
        for name, part in zip("qkv", source[a + "attn.in_proj_bias"].chunk(3)):
            take(a + "attn.in_proj_bias", b + f"self_attn.{name}_proj.bias", part)
        for o, t in (
            ("attn.out_proj", "self_attn.out_proj"),
            ("ln_1", "layer_norm1"),
            ("ln_2", "layer_norm2"),
            ("mlp.c_fc", "mlp.fc1"),
            ("mlp.c_proj", "mlp.fc2"),
        ):
            for p in ("weight", "bias"):
                take(f"{a}{o}.{p}", f"{b}{t}.{p}")


def _converter(source: dict, where: str):
    """(take, finish): `take(ours, theirs, value=None)` records a tensor under its new name; `finish()` returns
    the new state, or names a tensor nothing took."""
    out, used = {}, set()

    def take(ours: str, theirs: str, value=None):
        out[theirs] = (source[ours] if value is None else value).detach().clone().float()
        used.add(ours)

    def finish() -> dict[str, torch.Tensor]:
        left = sorted(set(source) - used)
        if left:
            raise ValueError(f"the {where} holds tensors with no transformers counterpart: {', '.join(left[:5])}")
        return out

    return take, finish


def text_state(model) -> dict[str, torch.Tensor]:
    """The text tower's tensors under transformers' names (every one mapped, or an error naming it)."""
    source = {k: v for k, v in model.state_dict().items() if not k.startswith("visual.") and k != "logit_scale"}
    take, finish = _converter(source, "text tower")
    take("token_embedding.weight", "text_model.embeddings.token_embedding.weight")
    take("positional_embedding", "text_model.embeddings.position_embedding.weight")
    _map_blocks(source, "transformer.resblocks.", "text_model.encoder.layers.", len(model.transformer.resblocks), take)
    for p in ("weight", "bias"):
        take(f"ln_final.{p}", f"text_model.final_layer_norm.{p}")
    if "text_projection" in source:  # a (W, D) matrix applied as x @ P
        take("text_projection", "text_projection.weight", source["text_projection"].T)
    else:
        take("text_projection.weight", "text_projection.weight")
    return finish()


def _vision_tower(model):
    """The open_clip VisionTransformer of `model`, or an error saying why its image tower cannot convert."""
    from open_clip.transformer import VisionTransformer

    visual = model.visual
    if not isinstance(visual, VisionTransformer):
        raise ValueError(
            f"the CLIP's image tower is a {type(visual).__name__}: transformers' CLIPVisionModel holds only the "
            "ViT image tower (patch embedding, class token, transformer), so this CLIP's image encoder cannot be "
            "converted; use a ViT CLIP"
        )
    if visual.attn_pool is not None or visual.pool_type != "tok" or visual.final_ln_after_pool:
        raise ValueError("the ViT pools other than by its class token after ln_post, which transformers' CLIP does not")
    return visual


def vision_config(model):
    """The CLIPVisionConfig of an open_clip CLIP's ViT image tower."""
    from transformers import CLIPVisionConfig

    visual = _vision_tower(model)
    block = visual.transformer.resblocks[0]
    return CLIPVisionConfig(
        hidden_size=visual.class_embedding.shape[0],
        intermediate_size=block.mlp.c_fc.weight.shape[0],
        num_hidden_layers=len(visual.transformer.resblocks),
        num_attention_heads=block.attn.num_heads,
        image_size=visual.image_size[0] if isinstance(visual.image_size, tuple) else visual.image_size,
        patch_size=visual.conv1.weight.shape[-1],
        hidden_act=_activation(visual),
        layer_norm_eps=visual.ln_post.eps,
        projection_dim=visual.proj.shape[1],
    )


def vision_state(model) -> dict[str, torch.Tensor]:
    """The ViT image tower's tensors under transformers' names (every one mapped, or an error naming it)."""
    visual = _vision_tower(model)
    source = {k: v for k, v in visual.state_dict().items()}
    take, finish = _converter(source, "image tower")
    take("conv1.weight", "vision_model.embeddings.patch_embedding.weight")
    take("class_embedding", "vision_model.embeddings.class_embedding")
    take("positional_embedding", "vision_model.embeddings.position_embedding.weight")
    for p in ("weight", "bias"):
        take(f"ln_pre.{p}", f"vision_model.pre_layrnorm.{p}")  # transformers' spelling
        take(f"ln_post.{p}", f"vision_model.post_layernorm.{p}")
    _map_blocks(
        source, "transformer.resblocks.", "vision_model.encoder.layers.", len(visual.transformer.resblocks), take
    )
    take("proj", "visual_projection.weight", source["proj"].T)
    return finish()


def _load(hf, state: dict, where: str):
    """`hf` with `state` loaded strictly (every tensor named by the conversion, each one used), in eval mode."""
    try:
        hf.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{where} conversion: {err}") from err
    return hf.eval()


def to_transformers_vision(model):
    """transformers' CLIPVisionModelWithProjection holding an open_clip CLIP's ViT image tower (fp32, eval
    mode): `image_embeds` is open_clip's `encode_image` (unnormalised)."""
    from transformers import CLIPVisionModelWithProjection

    return _load(CLIPVisionModelWithProjection(vision_config(model)), vision_state(model), "image tower")


def to_transformers_text(model):
    """transformers' CLIPTextModelWithProjection holding an open_clip CLIP's text tower (fp32, eval mode):
    `text_embeds` is open_clip's `encode_text` (unnormalised), `last_hidden_state` its per-token encodings."""
    from transformers import CLIPTextModelWithProjection

    return _load(CLIPTextModelWithProjection(text_config(model)), text_state(model), "text tower")


def check_tokenizer(encoder) -> None:
    """Refuse a CLIP whose tokenizer is not open_clip's own BPE (the only vocabulary write_tokenizer writes)."""
    from open_clip.tokenizer import SimpleTokenizer

    vocab = encoder.model.token_embedding.weight.shape[0]
    if not isinstance(encoder.tokenizer, SimpleTokenizer) or vocab != len(SimpleTokenizer().encoder):
        raise ValueError(
            f"the CLIP's tokenizer is a {type(encoder.tokenizer).__name__} over {vocab} tokens: only open_clip's own "
            "BPE vocabulary (49 408 tokens) is written as CLIPTokenizer files"
        )


def write_tokenizer(folder: str | Path, context_length: int) -> Path:
    """CLIPTokenizer files for open_clip's BPE vocabulary (its special tokens under transformers' names, padding
    with the end token, `context_length` tokens) in `folder`; returns the folder."""
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    bpe = SimpleTokenizer()
    vocab = {SPECIAL.get(token, token): i for token, i in bpe.encoder.items()}
    merges = [" ".join(pair) for pair, _ in sorted(bpe.bpe_ranks.items(), key=lambda item: item[1])]
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tokenizer = CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token=PAD, model_max_length=context_length
    )
    tokenizer.save_pretrained(folder)
    return folder
