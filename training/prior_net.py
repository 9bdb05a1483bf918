"""The diffusion prior network (unCLIP §2.2), as diffusers' `PriorTransformer`: Karlo's and Kandinsky 2.2's.

A causal transformer over, in order: [text token encodings (optional, T = `max_text_tokens`), z_t, the
timestep embedding, x_t (the noised image embedding), the `prd` query token]; the output at the query
is x_0, the clean image embedding, in the prior's normalised space x = (z − clip_mean) / clip_std.
With `clip_space: raw` the prior reads raw CLIP vectors (unit × the shards' norm columns), as Karlo's
and Kandinsky 2.2's do and as diffusers' pipelines feed them: published priors carry their
clip_mean / clip_std (training/published.py); from scratch they are the per-dimension mean and std of
the training data's raw image embeddings (`set_statistics`). With `clip_space: unit` it reads unit
vectors with clip_mean 0 and clip_std 1/√D (so x_0 = √D·z_i, per-dimension variance ~1). Padding tokens are masked out of attention.
The network knows nothing of dropped captions: the caller passes the empty caption's encodings in
their place (training/conditioning.py).

Because the network *is* a `PriorTransformer` (under `.transformer`), its weights load from and save
to diffusers' folders without conversion.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

CLIP_SPACES = ("unit", "raw")


@dataclass
class PriorConfig:
    """Sizes of the prior; named sizes live in configs/prior/*.yaml. Then PriorTransformer's layout switches
    (its defaults are Karlo's; a published folder's config.json sets them, training/published.py) and the
    space of the vectors it reads."""

    dim: int = 768  # CLIP embedding dim D
    width: int = 768
    depth: int = 12
    heads: int = 12
    text_token_width: int = 0  # width of per-token text encodings; 0 = not used, else D (PriorTransformer's)
    max_text_tokens: int = 77  # the token slots; shorter encodings are padded and masked
    dropout: float = 0.0
    time_embed_act_fn: str = "silu"
    norm_in_type: str | None = None
    embedding_proj_norm_type: str | None = None
    clip_space: str = "unit"  # unit: reads unit vectors (clip_std 1/√D); raw: raw CLIP vectors (what exports)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def raw(self) -> bool:
        """Whether the prior reads raw CLIP vectors (unit × norm) rather than unit ones."""
        return self.clip_space == "raw"

    def check(self) -> None:
        """Refuse sizes a PriorTransformer cannot hold, naming the key."""
        if self.width % self.heads:
            raise ValueError(f"prior.width {self.width} is not a multiple of prior.heads {self.heads}")
        if self.text_token_width and self.text_token_width != self.dim:
            raise ValueError(
                f"prior.text_token_width {self.text_token_width} differs from the CLIP dim {self.dim}: a "
                "PriorTransformer projects token encodings with a layer of the CLIP's embedding width (as Karlo's "
                "and Kandinsky's do); use a CLIP whose text width equals its embedding dim, or text_tokens: none"
            )
        if self.clip_space not in CLIP_SPACES:
            raise ValueError(f"prior.clip_space {self.clip_space!r}: use 'unit' or 'raw'")


def transformer_kwargs(config: PriorConfig) -> dict:
    """The `PriorTransformer` arguments of a PriorConfig."""
    return dict(
        num_attention_heads=config.heads,
        attention_head_dim=config.width // config.heads,
        num_layers=config.depth,
        embedding_dim=config.dim,
        num_embeddings=config.max_text_tokens if config.text_token_width else 0,
        additional_embeddings=4,
        dropout=config.dropout,
        time_embed_act_fn=config.time_embed_act_fn,
        norm_in_type=config.norm_in_type,
        embedding_proj_norm_type=config.embedding_proj_norm_type,
        encoder_hid_proj_type="linear" if config.text_token_width else None,
        added_emb_type="prd",
    )


class DiffusionPrior(nn.Module):
    """x_0 = prior(x_t, t, z_t, text_tokens, token_mask), all vectors in the prior's space (see module doc)."""

    def __init__(self, config: PriorConfig):
        super().__init__()
        from diffusers import PriorTransformer

        config.check()
        self.config = config
        self.transformer = PriorTransformer(**transformer_kwargs(config))
        t = self.transformer
        # From scratch: small random positions and query (diffusers starts them at zero), unit-space statistics.
        # Published weights overwrite all of these when loaded.
        with torch.no_grad():
            t.positional_embedding.normal_(0, 0.02)
            t.prd_embedding.normal_(0, 0.02)
            t.clip_std.fill_(config.dim**-0.5)
        t.clip_mean.requires_grad_(False)  # statistics of the data, not weights to train
        t.clip_std.requires_grad_(False)

    def set_statistics(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Set clip_mean / clip_std (D,) from data (a raw-space prior trained from scratch)."""
        with torch.no_grad():
            self.transformer.clip_mean.copy_(mean.reshape(self.transformer.clip_mean.shape))
            self.transformer.clip_std.copy_(std.reshape(self.transformer.clip_std.shape))

    def normalise(self, z: torch.Tensor) -> torch.Tensor:
        """CLIP image embeddings → the space the diffusion runs in: (z − clip_mean) / clip_std."""
        t = self.transformer
        return (z - t.clip_mean.to(z.dtype)) / t.clip_std.to(z.dtype)

    def denormalise(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of `normalise` (diffusers' `post_process_latents`)."""
        return self.transformer.post_process_latents(x)

    def example_inputs(self, batch: int) -> tuple:
        """Inputs of `batch` rows in forward's shapes (random, on the network's device; meta builds meta ones):
        what the memory and FLOP estimate runs (training/memory.py)."""
        c, device = self.config, self.transformer.clip_std.device
        tokens = torch.randn(batch, c.max_text_tokens, c.dim, device=device) if c.text_token_width else None
        mask = torch.ones(batch, c.max_text_tokens, dtype=torch.bool, device=device) if c.text_token_width else None
        t = torch.zeros(batch, dtype=torch.long, device=device)
        return torch.randn(batch, c.dim, device=device), t, torch.randn(batch, c.dim, device=device), tokens, mask

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        z_t: torch.Tensor,
        text_tokens: torch.Tensor | None = None,
        token_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x_t: (B, D) normalised; t: (B,); z_t: (B, D) text embeddings; text_tokens: (B, T, D) with T <=
        max_text_tokens; token_mask: (B, T) True = real. Returns x_0 (B, D), normalised."""
        b = x_t.shape[0]
        slots = self.transformer.config.num_embeddings
        if slots:
            if text_tokens is None:
                raise ValueError("this prior was built with text_token_width > 0: pass text_tokens")
            if text_tokens.shape[1] > slots:
                raise ValueError(f"{text_tokens.shape[1]} text tokens do not fit the prior's {slots} token slots")
            if token_mask is None:
                token_mask = torch.ones(text_tokens.shape[:2], dtype=torch.bool, device=x_t.device)
            pad = slots - text_tokens.shape[1]
            text_tokens = F.pad(text_tokens, (0, 0, 0, pad))
            token_mask = F.pad(token_mask, (0, pad), value=False)
        else:
            text_tokens, token_mask = None, torch.ones(b, 0, dtype=torch.bool, device=x_t.device)
        # A mask is always passed: without one PriorTransformer attends without its causal mask.
        return self.transformer(
            x_t, t, proj_embedding=z_t, encoder_hidden_states=text_tokens, attention_mask=token_mask
        ).predicted_image_embedding
