"""What the prior and the decoders are conditioned on, and what a dropped condition is.

Classifier-free guidance trains each model with its condition sometimes dropped and samples with
`uncond + s · (cond − uncond)`. What "dropped" means is settled here, once:

- **A dropped caption is the empty caption as the frozen CLIP encodes it**: the text embedding
  z_t("") (unit-normalised like every z_t) and, where per-token encodings are used, the token
  encodings of "" with their mask (start and end tokens real, the rest padding). This is what
  diffusers' UnCLIP (Karlo) and Kandinsky 2.2 pipelines feed as the unconditional input, so a
  published prior or decoder and ours agree on what guidance subtracts, and a caption-less call
  (image variations) is exactly the dropped condition the model learned.
- **A dropped CLIP embedding is the zero vector** (the decoder's z_i, the baseline's z_t, the
  upsampler's z_i).

The CLIP is loaded on first use (or given), kept outside the modules' parameters (never in a
checkpoint or an export), run in fp32, and its outputs are ordinary tensors that training may use.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TEXT_TOKEN_MODES = ("none", "clip")


@dataclass
class Caption:
    """A batch's caption condition: z_t (B, D) or None, and token encodings (B, T, W) + mask (B, T) or None."""

    z_t: torch.Tensor | None = None
    tokens: torch.Tensor | None = None
    mask: torch.Tensor | None = None


class FrozenText:
    """The frozen CLIP text tower: per-token encodings of captions and the empty caption.

    `tokens(captions, device)` → (encodings (B, T, W), mask (B, T)), or (None, None) when mode is 'none';
    `empty(device)` → the dropped caption as a `Caption` of one row."""

    def __init__(self, mode: str = "none", clip: dict | None = None, encoder=None):
        if mode not in TEXT_TOKEN_MODES:
            raise ValueError(f"text_tokens {mode!r}: use 'none' or 'clip'")
        self.mode, self.clip, self._encoder = mode, dict(clip or {}), encoder
        self._empty: dict[str, Caption] = {}

    def encoder(self, device: torch.device | str = "cpu"):
        """The CLIP named by `clip` (model, weights or pretrained), loaded once in fp32."""
        if self._encoder is None:
            from embeddings.encoders import load_encoder

            spec = {k: self.clip[k] for k in ("model", "weights", "pretrained") if self.clip.get(k) is not None}
            if not spec:
                raise ValueError("the caption condition needs the CLIP the embeddings were made with: none was named")
            self._encoder = load_encoder(dict(spec, precision="fp32", device=str(device)))
        return self._encoder

    def width(self) -> tuple[int, int]:
        """(token encoding width W, context length T) of the CLIP's text tower."""
        model = self.encoder().model
        return int(model.ln_final.weight.shape[0]), int(model.positional_embedding.shape[0])

    def tokens(self, captions: list[str], device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self.mode == "none":
            return None, None
        tokens, mask = self.encoder(device).encode_text_tokens(captions)
        return tokens.clone().to(device), mask.clone().to(device)  # clones: ordinary tensors, not inference tensors

    def empty(self, device) -> Caption:
        """The empty caption "" as the CLIP encodes it: the condition a dropped caption becomes."""
        key = str(device)
        if key not in self._empty:
            z_t = self.encoder(device).encode_texts([""]).clone().to(device)
            tokens, mask = self.tokens([""], device)
            self._empty[key] = Caption(z_t, tokens, mask)
        return self._empty[key]


def drop_caption(caption: Caption, drop: torch.Tensor | None, empty: Caption) -> Caption:
    """The caption condition with the rows where `drop` (B,) is True replaced by the empty caption."""
    if drop is None or not bool(drop.any()):
        return caption

    def swap(value: torch.Tensor | None, null: torch.Tensor | None) -> torch.Tensor | None:
        if value is None:
            return None
        where = drop.view(-1, *([1] * (value.dim() - 1)))
        return torch.where(where, null.to(value.dtype).expand_as(value), value)

    return Caption(swap(caption.z_t, empty.z_t), swap(caption.tokens, empty.tokens), swap(caption.mask, empty.mask))


def drop_embedding(z: torch.Tensor, drop: torch.Tensor | None) -> torch.Tensor:
    """The CLIP embeddings (B, D) with the rows where `drop` (B,) is True zeroed."""
    if drop is None:
        return z
    return torch.where(drop[:, None], torch.zeros_like(z), z)


def fit_text_tokens(sizes: dict, text_tokens: str, clip: dict, kind: str) -> dict:
    """Network sizes with the per-token width (and, where the network has one, the token count) taken from
    the CLIP's text tower when `text_tokens` is 'clip'. A width set without text tokens, or one that
    disagrees with the CLIP, is an error: the tokens would be ignored or would not fit."""
    from embeddings.config import ConfigError

    sizes = dict(sizes)
    if text_tokens != "clip":
        if sizes.get("text_token_width"):
            raise ConfigError(
                f"{kind}.text_token_width is set but text_tokens is {text_tokens!r}: set text_tokens: clip"
            )
        return sizes
    width, length = FrozenText("clip", clip).width()
    if not sizes.get("text_token_width"):
        sizes["text_token_width"] = width
    if sizes["text_token_width"] != width:
        raise ConfigError(
            f"{kind}.text_token_width {sizes['text_token_width']} disagrees with the CLIP's text width {width}"
        )
    if kind == "prior":
        sizes.setdefault("max_text_tokens", length)
        if sizes["max_text_tokens"] < length:
            raise ConfigError(
                f"prior.max_text_tokens {sizes['max_text_tokens']} is shorter than the CLIP's {length} tokens"
            )
    return sizes
