"""The diffusion prior network (unCLIP §2.2): a causal transformer that predicts a clean CLIP image embedding.

Sequence, in order: [text token encodings (optional, T), z_t, timestep embedding, x_t (noised z_i),
learned query]; causal attention, so the query sees everything before it; the output at the query
is x_0, the clean image embedding (trained with MSE on x_0). The network knows nothing of dropped
captions: the caller passes the empty caption's encodings in their place (training/conditioning.py).
Padding tokens are replaced by a learned null token, so no attention row is ever fully masked.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn


@dataclass
class PriorConfig:
    """Sizes of the prior; named sizes live in configs/prior/*.yaml."""

    dim: int = 768  # CLIP embedding dim D
    width: int = 768
    depth: int = 12
    heads: int = 12
    text_token_width: int = 0  # width of per-token text encodings; 0 = not used
    max_text_tokens: int = 77
    dropout: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def timestep_embedding(t: torch.Tensor, width: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps (B,) → (B, width)."""
    half = width // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class DiffusionPrior(nn.Module):
    """x_0 = prior(x_t, t, z_t, text_tokens, token_mask)."""

    def __init__(self, config: PriorConfig):
        super().__init__()
        self.config = c = config
        self.in_text = nn.Linear(c.dim, c.width)
        self.in_noised = nn.Linear(c.dim, c.width)
        self.in_tokens = nn.Linear(c.text_token_width, c.width) if c.text_token_width else None
        self.time_mlp = nn.Sequential(nn.Linear(c.width, c.width), nn.SiLU(), nn.Linear(c.width, c.width))
        self.null_token = nn.Parameter(torch.zeros(c.width)) if c.text_token_width else None
        self.query = nn.Parameter(torch.randn(c.width) * 0.02)
        tokens = (c.max_text_tokens if c.text_token_width else 0) + 4
        self.position = nn.Parameter(torch.randn(tokens, c.width) * 0.02)
        layer = nn.TransformerEncoderLayer(
            c.width, c.heads, 4 * c.width, c.dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.transformer = nn.TransformerEncoder(layer, c.depth, norm=nn.LayerNorm(c.width), enable_nested_tensor=False)
        self.out = nn.Linear(c.width, c.dim)

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        z_t: torch.Tensor,
        text_tokens: torch.Tensor | None = None,
        token_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x_t, z_t: (B, D); t: (B,); text_tokens: (B, T, W) with T <= max_text_tokens; token_mask: (B, T) True = real."""
        b = x_t.shape[0]
        parts = [
            self.in_text(z_t),
            self.time_mlp(timestep_embedding(t, self.config.width)),
            self.in_noised(x_t),
            self.query.expand(b, -1),
        ]
        sequence = torch.stack(parts, dim=1)  # (B, 4, width)
        if self.in_tokens is not None:
            if text_tokens is None:
                raise ValueError("this prior was built with text_token_width > 0: pass text_tokens")
            tokens = self.in_tokens(text_tokens)  # (B, T, width)
            if token_mask is not None:
                tokens = torch.where(token_mask[..., None], tokens, self.null_token.expand_as(tokens))
            sequence = torch.cat([tokens, sequence], dim=1)
        sequence = sequence + self.position[-sequence.shape[1] :]
        causal = torch.triu(torch.ones(sequence.shape[1], sequence.shape[1], dtype=torch.bool, device=x_t.device), 1)
        hidden = self.transformer(sequence, mask=causal)
        return self.out(hidden[:, -1])  # the query's output: x_0 (B, D)
