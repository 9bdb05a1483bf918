"""Per-token text encodings from the frozen CLIP text tower, for the prior and the decoder.

The CLIP is loaded on first use from the EncoderSpec fields the embeddings were made with, kept
outside the module's parameters (never in a checkpoint or an export), and run in fp32.
"""

from __future__ import annotations

import torch

TEXT_TOKEN_MODES = ("none", "clip")


class FrozenTextTokens:
    """`tokens(captions, device)` → (encodings (B, T, W), mask (B, T)) or (None, None) when mode is 'none'."""

    def __init__(self, mode: str, clip: dict | None):
        if mode not in TEXT_TOKEN_MODES:
            raise ValueError(f"text_tokens {mode!r}: use 'none' or 'clip'")
        self.mode, self.clip, self._encoder = mode, dict(clip or {}), None

    def __call__(self, captions: list[str], device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self.mode == "none":
            return None, None
        if self._encoder is None:
            from embeddings.encoders import load_encoder

            spec = {k: self.clip.get(k) for k in ("model", "weights", "pretrained") if self.clip.get(k) is not None}
            self._encoder = load_encoder(dict(spec, precision="fp32", device=str(device)))
        tokens, mask = self._encoder.encode_text_tokens(captions)
        return tokens.to(device), mask.to(device)
