"""open_clip's towers and tokenizer converted to transformers' (embeddings/hf_clip.py), as the diffusers
pipelines load them: the same ids, the same embeddings."""

from __future__ import annotations

import torch

CAPTIONS = [
    "a red circle, on black!",
    "Ça coûte 5€ — très cher?!",
    "東京の 赤い 四角",
    "don't  STOP\tnow",
    "emoji 🎨 (x) [y] {z}",
    "",
    "word " * 40,  # longer than the context: cut to it, the end token last
]


def test_the_written_tokenizer_gives_open_clips_ids_and_pads_with_the_end_token(tiny_clip_dir, tmp_path):
    from transformers import CLIPTokenizer

    from embeddings.hf_clip import write_tokenizer
    from training.conditioning import load_clip

    encoder = load_clip({"model": str(tiny_clip_dir)})
    ids = encoder.tokenizer(CAPTIONS)
    length = ids.shape[1]
    tokenizer = CLIPTokenizer.from_pretrained(write_tokenizer(tmp_path, length))
    theirs = tokenizer(CAPTIONS, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
    real = ids != 0
    assert torch.equal(theirs.attention_mask.bool(), real)
    assert torch.equal(theirs.input_ids[real], ids[real])
    assert bool((theirs.input_ids[~real] == tokenizer.eos_token_id).all())
    assert ids[-1, -1] == tokenizer.eos_token_id and bool(real[-1].all())  # the over-long one, cut


def test_the_converted_text_tower_computes_open_clips_embeddings_and_token_encodings(tiny_clip_dir, tmp_path):
    """text_embeds = open_clip's encode_text, last_hidden_state = our per-token encodings on the real tokens,
    from the transformers tokenizer's ids (end-token padding) as from open_clip's (zero padding)."""
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    from embeddings.hf_clip import to_transformers_text, write_tokenizer
    from training.conditioning import load_clip

    encoder = load_clip({"model": str(tiny_clip_dir)})
    to_transformers_text(encoder.model).save_pretrained(tmp_path / "text_encoder")
    hf = CLIPTextModelWithProjection.from_pretrained(tmp_path / "text_encoder").eval()
    ids = encoder.tokenizer(CAPTIONS)
    tokenizer = CLIPTokenizer.from_pretrained(write_tokenizer(tmp_path / "tokenizer", ids.shape[1]))
    theirs = tokenizer(CAPTIONS, padding="max_length", truncation=True, max_length=ids.shape[1], return_tensors="pt")
    with torch.no_grad():
        raw = encoder.model.encode_text(ids)
        tokens, mask = encoder.encode_text_tokens(CAPTIONS)
        for input_ids in (ids, theirs.input_ids):
            out = hf(input_ids=input_ids, attention_mask=theirs.attention_mask)
            torch.testing.assert_close(out.text_embeds, raw, atol=1e-5, rtol=0)
            torch.testing.assert_close(out.last_hidden_state[mask], tokens[mask], atol=1e-5, rtol=0)


def test_the_converted_vit_image_tower_computes_open_clips_image_embeddings(tiny_clip_dir, tmp_path):
    from transformers import CLIPVisionModelWithProjection

    from embeddings.hf_clip import to_transformers_vision
    from training.conditioning import load_clip

    encoder = load_clip({"model": str(tiny_clip_dir)})
    to_transformers_vision(encoder.model).save_pretrained(tmp_path / "image_encoder")
    hf = CLIPVisionModelWithProjection.from_pretrained(tmp_path / "image_encoder").eval()
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(
            hf(pixel_values=pixels).image_embeds, encoder.model.encode_image(pixels), atol=1e-5, rtol=0
        )
