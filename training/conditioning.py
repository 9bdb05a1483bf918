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
  upsampler's z_i), except in Karlo's decoder layout, which drops z_i to a learned vector
  (`UnCLIPTextProjModel.learned_classifier_free_guidance_embeddings`, the network's `null_embedding()`),
  as UnCLIPPipeline's unconditional half does.

The CLIP is the one the embeddings were made with (its manifest record; a checksum that differs is
refused), loaded once per process, kept outside the modules' parameters (never in a checkpoint or
an export), and its outputs are ordinary tensors that training may use. Token encodings run in the
precision of the surrounding autocast (bf16 under bf16-mixed); the empty caption is encoded in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from embeddings.config import ConfigError

TEXT_TOKEN_MODES = ("none", "clip")
_ENCODERS: dict[tuple, object] = {}  # one loaded CLIP per spec in a process (jobs, modules and samplers share it)


def load_clip(clip: dict):
    """The CLIP of a manifest's encoder record (model, weights, pretrained; checksum checked when known)."""
    from embeddings.encoders import load_encoder

    spec = {k: clip[k] for k in ("model", "weights", "pretrained") if clip.get(k) is not None}
    if not spec.get("model"):
        raise ConfigError(
            "the captions are encoded by the CLIP that made the embeddings, and their manifest names none: "
            "set embed.encoder in the data config (make embed records it; make import-clip-retrieval takes it)"
        )
    key = tuple(sorted(spec.items()))
    if key not in _ENCODERS:
        _ENCODERS[key] = load_encoder(dict(spec, precision="fp32", device="cpu"))
    encoder = _ENCODERS[key]
    recorded = clip.get("checksum")
    if recorded and not str(recorded).startswith("unknown") and recorded != encoder.checksum:
        raise ConfigError(
            f"the CLIP at {spec['model']} (checksum {encoder.checksum[:12]}…) is not the one the embeddings "
            f"were made with ({str(recorded)[:12]}…)"
        )
    return encoder


@dataclass
class Caption:
    """A batch's caption condition: z_t (B, D) or None, and token encodings (B, T, W) + mask (B, T) or None."""

    z_t: torch.Tensor | None = None
    tokens: torch.Tensor | None = None
    mask: torch.Tensor | None = None

    def map(self, fn) -> Caption:
        """`fn` applied to each present part (row-wise operations: repeat, expand, index)."""
        return Caption(*(None if v is None else fn(v) for v in (self.z_t, self.tokens, self.mask)))

    def cat(self, other: Caption) -> Caption:
        """This batch's rows, then `other`'s (guidance runs both halves in one forward pass)."""
        parts = zip((self.z_t, self.tokens, self.mask), (other.z_t, other.tokens, other.mask))
        return Caption(*(None if a is None else torch.cat([a, b]) for a, b in parts))


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
        """The CLIP (given, or named by `clip`), on `device`."""
        if self._encoder is None:
            self._encoder = load_clip(self.clip)
        if self._encoder.device != torch.device(device):
            self._encoder.to(device)
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

    def empty(self, device, raw: bool = False) -> Caption:
        """The empty caption "" as the CLIP encodes it (in fp32): the condition a dropped caption becomes.
        z_t("") is a unit vector, or with `raw` the CLIP's raw text embedding (for priors in raw space)."""
        key = f"{device}/{raw}"
        if key not in self._empty:
            with torch.autocast(torch.device(device).type, enabled=False):
                z_t, norm = self.encoder(device).encode_texts([""], norms=True)
                z_t = (z_t * norm[:, None] if raw else z_t).clone().to(device)
                tokens, mask = self.tokens([""], device)
            self._empty[key] = Caption(z_t, tokens, mask)
        return self._empty[key]

    def norms(self, captions: list[str], device) -> torch.Tensor:
        """The norms (B,) of the CLIP's raw text embeddings of `captions` (in fp32): unit z_t × norm = raw z_t."""
        with torch.autocast(torch.device(device).type, enabled=False):
            return self.encoder(device).encode_texts(list(captions), norms=True)[1].clone().to(device)


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


def drop_embedding(z: torch.Tensor, drop: torch.Tensor | None, null: torch.Tensor | None = None) -> torch.Tensor:
    """The CLIP embeddings (B, D) with the rows where `drop` (B,) is True replaced by `null` (D,): the zero vector
    unless the network learns its own (Karlo's decoder)."""
    if drop is None:
        return z
    null = torch.zeros_like(z) if null is None else null.to(z.dtype).expand_as(z)
    return torch.where(drop[:, None], null, z)


def fit_text_tokens(sizes: dict, text_tokens: str, clip: dict, kind: str) -> dict:
    """Network sizes with the per-token width (and, where the network has one, the token count) taken from
    the CLIP's text tower when `text_tokens` is 'clip'. A width set without text tokens, or one that
    disagrees with the CLIP, is an error: the tokens would be ignored or would not fit."""
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
