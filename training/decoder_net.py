"""The decoder and upsampler networks (unCLIP §2.1), on diffusers' UNets.

Decoder: ε = decoder(x_t, t, z). The CLIP embedding z is conditioned on twice, as the paper does:
projected and added to the timestep embedding (the UNet's `class_embed_type="projection"`), and
projected into 4 extra context tokens that every cross-attention layer attends to, concatenated
with projected text token encodings when those are used. Cross-attention runs `channels // head_width`
heads of width `head_width` at each level. A dropped z is the caller's `drop` mask: the network
puts its `null_embedding()` there itself (inside forward, where a sharded network's weights are whole);
a dropped caption is the empty caption's tokens, which the caller passes (training/conditioning.py). Karlo's layout (`KarloDecoder`, `layout: karlo`, the form that exports) is described at
its class; it reads raw CLIP vectors (unit × the shards' norm columns), this one unit vectors.
`z` is whatever vector the module conditions on: the CLIP image embedding for unCLIP, the CLIP text
embedding for the GLIDE-like baseline (same network, same places).

Upsampler: its prediction (ε, v or x_0) = upsampler(x_t, t, low), the low-resolution image upsampled (bicubic, as UnCLIPPipeline
does) to x_t's size and concatenated as 3 extra input channels: a UNet2DModel as Karlo's
super-resolution stages; convolutional only, so it trains on random crops and samples whole images.
The paper's upsamplers see only the low-resolution image (the demo's, and the only kind that
exports); with `dim > 0` this one also adds the projected CLIP image embedding to its timestep
embedding, so that where the base decoder drew a blob, the embedding can still say which shape it is.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import UNet2DConditionModel, UNet2DModel

from training.conditioning import drop_embedding


@dataclass
class DecoderConfig:
    """Sizes of the decoder; named sizes live in configs/decoder/*.yaml."""

    image_size: int = 64  # the decoder's own (base) resolution
    dim: int = 768  # CLIP embedding dim D
    channels: list[int] = field(default_factory=lambda: [192, 384, 576, 768])
    layers_per_block: int = 2
    head_width: int = 64
    context_tokens: int = 4  # tokens projected from z (the paper's 4)
    context_width: int = 512  # width of the cross-attention context
    text_token_width: int = 0  # width of per-token text encodings; 0 = not used
    norm_groups: int = 32
    layout: str = "cross_attention"  # or "karlo": Karlo's blocks and UnCLIPTextProjModel (see KarloDecoder)
    learned_variance: bool = False  # also output the reverse step's variance (6 channels; the hybrid loss)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def raw(self) -> bool:
        """Whether the decoder reads raw CLIP vectors (unit × norm): Karlo's layout does, as UnCLIPPipeline feeds
        them; the cross-attention layout reads unit vectors and scales them by √D itself."""
        return self.layout == "karlo"


@dataclass
class UpsamplerConfig:
    """Sizes of a 4× upsampler; `image_size` is its output resolution."""

    image_size: int = 64
    factor: int = 4
    dim: int = 0  # > 0: also conditioned on the CLIP image embedding (added to the timestep embedding)
    channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    layers_per_block: int = 1
    norm_groups: int = 16
    unet: dict | None = None  # a published UNet2DModel's whole config (init_from): it replaces the sizes above

    def to_dict(self) -> dict:
        return asdict(self)


def attention_heads(channels: list[int], head_width: int) -> tuple[int, ...]:
    """Heads per UNet level: channels // head_width, each head `head_width` wide (the first level has no
    attention; its entry is not used)."""
    for level, width in enumerate(channels[1:], 1):
        if width % head_width:
            raise ValueError(f"decoder.channels[{level}] = {width} is not a multiple of head_width {head_width}")
    return tuple(max(1, width // head_width) for width in channels)


DECODER_LAYOUTS = ("cross_attention", "karlo")


def build_decoder(config: DecoderConfig) -> nn.Module:
    """The decoder network of a config's layout."""
    if config.layout not in DECODER_LAYOUTS:
        raise ValueError(f"decoder.layout {config.layout!r}: use one of {', '.join(DECODER_LAYOUTS)}")
    return KarloDecoder(config) if config.layout == "karlo" else Decoder(config)


class Decoder(nn.Module):
    """ε = decoder(x_t, t, z, text_tokens, token_mask)."""

    reads_text_embedding = False  # callers encode z_t only for decoders that read it

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.config = c = config
        if c.learned_variance:
            raise ValueError("decoder.learned_variance needs layout: karlo")
        levels = len(c.channels)
        self.unet = UNet2DConditionModel(
            sample_size=c.image_size,
            in_channels=3,
            out_channels=3,
            block_out_channels=tuple(c.channels),
            layers_per_block=c.layers_per_block,
            norm_num_groups=c.norm_groups,
            down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1),
            up_block_types=("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",),
            cross_attention_dim=c.context_width,
            # diffusers reads this argument as heads per block (its naming, kept for old configs)
            attention_head_dim=attention_heads(c.channels, c.head_width),
            class_embed_type="projection",
            projection_class_embeddings_input_dim=c.dim,
        )
        self.to_context = nn.Linear(c.dim, c.context_tokens * c.context_width)
        self.in_tokens = nn.Linear(c.text_token_width, c.context_width) if c.text_token_width else None
        self.scale = math.sqrt(c.dim)  # unit vectors → per-dimension variance ~1

    def example_inputs(self, batch: int) -> tuple:
        """Inputs of `batch` rows in forward's shapes (random, on the network's device; meta builds meta ones):
        what the memory and FLOP estimate runs (training/memory.py)."""
        return decoder_example_inputs(self.config, batch, self.to_context.weight.device)

    def null_embedding(self) -> torch.Tensor:
        """What a dropped CLIP embedding becomes: the zero vector."""
        return torch.zeros(self.config.dim, device=self.to_context.weight.device)

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        z: torch.Tensor,
        text_tokens: torch.Tensor | None = None,
        token_mask: torch.Tensor | None = None,
        z_t: torch.Tensor | None = None,
        drop: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x_t: (B, 3, H, W); t: (B,); z: (B, D) unit; text_tokens (B, T, W); token_mask (B, T) True = real;
        drop (B,) True where z is dropped (classifier-free guidance: the null embedding in its place, inside
        forward so that a sharded network's weights are only read there). z_t is not read (this layout conditions
        on z and the tokens only; the caller need not pass it)."""
        b = x_t.shape[0]
        z = drop_embedding(z, drop, self.null_embedding()) * self.scale
        context = self.to_context(z).view(b, self.config.context_tokens, self.config.context_width)
        keep = torch.ones(context.shape[:2], dtype=torch.bool, device=x_t.device)
        if self.in_tokens is not None:
            if text_tokens is None:
                raise ValueError("this decoder was built with text_token_width > 0: pass text_tokens")
            token_keep = (
                token_mask
                if token_mask is not None
                else torch.ones(text_tokens.shape[:2], dtype=torch.bool, device=x_t.device)
            )
            context = torch.cat([context, self.in_tokens(text_tokens)], dim=1)
            keep = torch.cat([keep, token_keep], dim=1)
        mask = keep.to(x_t.dtype) if self.in_tokens is not None else None
        return self.unet(x_t, t, encoder_hidden_states=context, class_labels=z, encoder_attention_mask=mask).sample


def karlo_unet_kwargs(c: DecoderConfig) -> dict:
    """The UNet2DConditionModel arguments of Karlo's decoder at the sizes of `c` (the one statement of its layout)."""
    levels = len(c.channels)
    return dict(
        sample_size=c.image_size,
        in_channels=3,
        out_channels=6 if c.learned_variance else 3,
        block_out_channels=tuple(c.channels),
        layers_per_block=c.layers_per_block,
        norm_num_groups=c.norm_groups,
        down_block_types=("ResnetDownsampleBlock2D",) + ("SimpleCrossAttnDownBlock2D",) * (levels - 1),
        up_block_types=("SimpleCrossAttnUpBlock2D",) * (levels - 1) + ("ResnetUpsampleBlock2D",),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        cross_attention_dim=c.context_width,
        attention_head_dim=c.head_width,  # these blocks read it as the head width
        resnet_time_scale_shift="scale_shift",
        class_embed_type="identity",
    )


class KarloDecoder(nn.Module):
    """ε (and variance values) = decoder(x_t, t, z, text_tokens, token_mask, z_t), in Karlo's layout: diffusers'
    `UnCLIPTextProjModel` turns z (the CLIP image embedding) and z_t (the pooled text embedding) into an
    addition to the timestep embedding and `context_tokens` extra context tokens, placed before the
    projected, layer-normed text token encodings; the UNet has Karlo's blocks (ResNet up/downsampling,
    scale-shift time conditioning, the simple cross-attention that attends to the context and the image
    at once) and `head_width`-wide heads. A dropped z is the text projection's learned null embedding. z and
    z_t are raw CLIP vectors (unit × norm), as the pipeline passes them.
    Its two parts are diffusers' classes as UnCLIPPipeline loads them (`text_proj`, `unet`)."""

    reads_text_embedding = True

    def __init__(self, config: DecoderConfig):
        super().__init__()
        from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel

        self.config = c = config
        if c.text_token_width != c.dim:
            raise ValueError(
                f"decoder.text_token_width {c.text_token_width} must equal the CLIP dim {c.dim}: Karlo's text projection "
                "reads the caption's token encodings (text_tokens: clip) with a layer of the CLIP's width"
            )
        attention_heads(c.channels, c.head_width)  # every attention level's width a multiple of head_width
        time_width = 4 * c.channels[0]
        self.text_proj = UnCLIPTextProjModel(
            clip_extra_context_tokens=c.context_tokens,
            clip_embeddings_dim=c.dim,
            time_embed_dim=time_width,
            cross_attention_dim=c.context_width,
        )
        self.unet = UNet2DConditionModel(**karlo_unet_kwargs(c))

    def example_inputs(self, batch: int) -> tuple:
        """Inputs of `batch` rows in forward's shapes (see Decoder.example_inputs)."""
        return decoder_example_inputs(self.config, batch, self.null_embedding().device)

    def null_embedding(self) -> torch.Tensor:
        """What a dropped CLIP embedding becomes: the text projection's learned vector."""
        return self.text_proj.learned_classifier_free_guidance_embeddings

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        z: torch.Tensor,
        text_tokens: torch.Tensor | None = None,
        token_mask: torch.Tensor | None = None,
        z_t: torch.Tensor | None = None,
        drop: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x_t (B, 3, H, W); t (B,); z, z_t (B, D) raw; text_tokens (B, T, D); token_mask (B, T) True = real; drop
        (B,) True where z is dropped (the learned null embedding in its place). Returns (B, 3, H, W) the
        prediction (ε or x_0, as trained), or (B, 6, H, W) the prediction and the variance values."""
        if text_tokens is None or z_t is None:
            raise ValueError("Karlo's decoder reads the caption: pass text_tokens and z_t")
        z = drop_embedding(z, drop, self.null_embedding())
        if token_mask is None:
            token_mask = torch.ones(text_tokens.shape[:2], dtype=torch.bool, device=x_t.device)
        context, time = self.text_proj(
            image_embeddings=z.to(x_t.dtype),
            prompt_embeds=z_t.to(x_t.dtype),
            text_encoder_hidden_states=text_tokens.to(x_t.dtype),
            do_classifier_free_guidance=False,
        )
        mask = F.pad(token_mask, (self.config.context_tokens, 0), value=True)
        return self.unet(x_t, t, encoder_hidden_states=context, class_labels=time, attention_mask=mask).sample


def _values_from_detached_features(module: nn.Conv2d, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    """conv_out's forward hook (see variance_values_from_detached_features)."""
    if not torch.is_grad_enabled():
        return output
    half = output.shape[1] // 2
    values = module._conv_forward(inputs[0].detach(), module.weight[half:], module.bias[half:])
    return torch.cat([output[:, :half], values], dim=1)


def variance_values_from_detached_features(conv_out: nn.Conv2d) -> torch.utils.hooks.RemovableHandle:
    """Make a learned-variance UNet's variance values (the second half of `conv_out`'s channels) read the network's
    last features detached while gradients are on: what trains the values (the variational bound and the range
    penalty) then trains the output layer's variance rows only, and the rest of the network learns from the
    prediction's loss alone. The output is unchanged. Improved DDPM lets the bound's gradient into the shared
    network; on the demo's 16 px x_0 decoder after 800 steps that gave fidelity 0.50 and position accuracy 0.67
    where this gives 0.68 and 0.95 (README, "Results")."""
    return conv_out.register_forward_hook(_values_from_detached_features)


class Upsampler(nn.Module):
    """ε = upsampler(x_t, t, low, z): low is (B, 3, h, w) at 1/factor of x_t's resolution; z (B, D) only
    when config.dim > 0 (zero where dropped)."""

    def __init__(self, config: UpsamplerConfig):
        super().__init__()
        self.config = c = config
        levels = len(c.channels)
        if c.unet:
            if (
                c.dim
                or c.unet.get("in_channels") != 6
                or c.unet.get("out_channels") != 3
                or c.unet.get("class_embed_type")
            ):
                raise ValueError(
                    "a published upsampler is a UNet2DModel reading the noisy and the upsampled image (6 channels in, "
                    "3 out) and nothing else (upsampler.dim 0)"
                )
            self.unet = UNet2DModel.from_config(c.unet)
        else:
            self.unet = UNet2DModel(
                sample_size=c.image_size,
                in_channels=6,
                out_channels=3,
                block_out_channels=tuple(c.channels),
                layers_per_block=c.layers_per_block,
                norm_num_groups=c.norm_groups,
                down_block_types=("DownBlock2D",) * levels,
                up_block_types=("UpBlock2D",) * levels,
                class_embed_type="identity" if c.dim else None,
            )
        self.to_time = nn.Linear(c.dim, 4 * c.channels[0]) if c.dim else None  # into the timestep embedding's width
        self.scale = math.sqrt(c.dim) if c.dim else 1.0

    def example_inputs(self, batch: int, crop: int = 0) -> tuple:
        """Inputs of `batch` rows in forward's shapes, of `crop`-pixel crops where training crops (see
        Decoder.example_inputs)."""
        c, device = self.config, next(self.parameters()).device
        size = crop or c.image_size
        z = torch.randn(batch, c.dim, device=device) if c.dim else None
        low = torch.randn(batch, 3, size // c.factor, size // c.factor, device=device)
        t = torch.zeros(batch, dtype=torch.long, device=device)
        return torch.randn(batch, 3, size, size, device=device), t, low, z

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        low: torch.Tensor,
        z: torch.Tensor | None = None,
    ) -> torch.Tensor:
        labels = None
        if self.to_time is not None:
            if z is None:
                raise ValueError("this upsampler was built with dim > 0: pass the CLIP image embedding z")
            labels = self.to_time(z * self.scale)
        return self.unet(torch.cat([x_t, upsample(low, x_t.shape[-1])], dim=1), t, class_labels=labels).sample


CAPTION_TOKENS = 77  # CLIP's context length (Radford et al. 2021): the token encodings a decoder reads at most


def decoder_example_inputs(c: DecoderConfig, batch: int, device: torch.device, tokens: int = CAPTION_TOKENS) -> tuple:
    """(x_t, t, z, text_tokens, token_mask, z_t) of `batch` rows for a decoder of config `c`: captions of
    `tokens` token encodings where it reads them."""
    text = torch.randn(batch, tokens, c.text_token_width, device=device) if c.text_token_width else None
    mask = torch.ones(batch, tokens, dtype=torch.bool, device=device) if c.text_token_width else None
    x_t = torch.randn(batch, 3, c.image_size, c.image_size, device=device)
    t = torch.zeros(batch, dtype=torch.long, device=device)
    return x_t, t, torch.randn(batch, c.dim, device=device), text, mask, torch.randn(batch, c.dim, device=device)


def upsample(low: torch.Tensor, size: int) -> torch.Tensor:
    """Bicubic resize of a [-1, 1] image batch to size × size (the upsampler's conditioning input), the call
    UnCLIPPipeline makes before its super-resolution UNets (antialiased kernel, not clamped)."""
    if low.shape[-1] == size:
        return low
    return F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False, antialias=True)


def downsample(images: torch.Tensor, size: int) -> torch.Tensor:
    """Area (box) downsampling of an image batch to size × size: how low-resolution targets are made."""
    if images.shape[-1] == size:
        return images
    return F.adaptive_avg_pool2d(images, size)
