"""Exports: a folder per trained model (models/<name>/{prior,decoder,upsampler}/) holding
`<kind>.safetensors` (the EMA weights) and `config.json` (the export format, network sizes, the
module's hyperparameters with its sampling defaults, the attention layout, metrics, and the CLIP it
was trained against). Loading checks the format, the layout and that CLIP's checksum, never
unpickles anything, and returns a plain sampler (training/samplers.py): no Lightning.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from embeddings import store
from embeddings.config import ConfigError
from training.conditioning import FrozenText
from training.decoder_net import DecoderConfig, Upsampler, UpsamplerConfig, build_decoder
from training.prior_net import DiffusionPrior, PriorConfig
from training.samplers import DecoderSampler, PriorSampler, UpsamplerSampler

CLIP_FIELDS = ("model", "weights", "pretrained", "checksum")
# Per kind, bumped whenever the same weights would mean something else. 2 = attention heads of width
# head_width (diffusers' argument read as head counts before), dropped captions as the encoded empty
# caption; prior 3 = the network is diffusers' PriorTransformer (training/prior_net.py).
FORMATS = {"prior": 3, "decoder": 2, "upsampler": 2}


def attention_layout(net: torch.nn.Module) -> list[list[int]]:
    """[heads, head width] of every attention layer, in module order: the split that a state dict's
    shapes do not record (the same weights load under any head count that divides the width)."""
    from diffusers.models.attention_processor import Attention

    layout = []
    for module in net.modules():
        if isinstance(module, Attention):
            layout.append([module.heads, module.inner_dim // module.heads])
        elif isinstance(module, torch.nn.MultiheadAttention):
            layout.append([module.num_heads, module.head_dim])
    return layout


def check_layout(net: torch.nn.Module, recorded, where: str) -> None:
    """Refuse weights whose recorded attention layout differs from the network built to hold them."""
    if recorded is None:
        raise ConfigError(
            f"{where} records no attention layout: it was written before heads were split as configured "
            "(format < 2); retrain it"
        )
    built = attention_layout(net)
    if [list(x) for x in recorded] != built:
        raise ConfigError(f"{where}: recorded attention layout {recorded} differs from this network's {built}")


def save_export(folder: str | Path, kind: str, net: torch.nn.Module, config: dict, encoder: dict) -> Path:
    """Write `<kind>.safetensors` and config.json (with the format, layout and CLIP record) atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    tmp = folder / f".{kind}.safetensors.tmp"
    save_file(state, str(tmp))
    tmp.replace(folder / f"{kind}.safetensors")
    record = dict(config, kind=kind, format=FORMATS[kind], layout=attention_layout(net))
    store.write_json(folder / "config.json", dict(record, clip={k: encoder.get(k) for k in CLIP_FIELDS}))
    return folder


def load_export(
    folder: str | Path, kind: str, clip_checksum: str | None = None
) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, state dict) of an export; another format, or a CLIP checksum that differs from the recorded
    one, is an error."""
    folder = Path(folder)
    if not (folder / "config.json").is_file() or not (folder / f"{kind}.safetensors").is_file():
        raise FileNotFoundError(f"no exported {kind} in {folder}: run `make train-{kind}` first")
    config = json.loads((folder / "config.json").read_text())
    if config.get("format") != FORMATS[kind]:
        raise ConfigError(
            f"the {kind} in {folder} is export format {config.get('format', 1)}, this code reads format "
            f"{FORMATS[kind]}: "
            f"retrain it (`make train-{kind}`)"
        )
    recorded = config["clip"].get("checksum")
    if clip_checksum is not None and recorded != clip_checksum:
        raise ConfigError(
            f"the {kind} in {folder} was trained against another CLIP (checksum {str(recorded)[:12]}…, "
            f"not {clip_checksum[:12]}…): retrain it on embeddings of this CLIP"
        )
    return config, load_file(str(folder / f"{kind}.safetensors"))


def _load(folder: str | Path, kind: str, build, clip_checksum: str | None) -> tuple[dict, torch.nn.Module]:
    """(config, network) of an export: format and CLIP checked, the network built from the recorded sizes,
    its attention layout checked, the weights loaded strictly."""
    config, state = load_export(folder, kind, clip_checksum)
    net = build(config[kind])
    check_layout(net, config.get("layout"), f"the {kind} in {folder}")
    net.load_state_dict(state)
    return config, net.requires_grad_(False).eval()


def load_prior(folder: str | Path, clip_checksum: str | None = None, encoder=None) -> PriorSampler:
    """An exported prior, ready to sample; `encoder`: the loaded CLIP it reads captions with (else loaded)."""
    config, net = _load(folder, "prior", lambda sizes: DiffusionPrior(PriorConfig(**sizes)), clip_checksum)
    hp = config["hparams"]
    return PriorSampler(net, FrozenText(hp["text_tokens"], config["clip"], encoder), hp["sampling"])


def load_decoder(folder: str | Path, clip_checksum: str | None = None, encoder=None) -> DecoderSampler:
    """An exported decoder (or the GLIDE-like baseline), ready to sample."""
    config, net = _load(folder, "decoder", lambda sizes: build_decoder(DecoderConfig(**sizes)), clip_checksum)
    hp = config["hparams"]
    text = FrozenText(hp["text_tokens"], config["clip"], encoder)
    return DecoderSampler(net, text, hp["prediction_type"], hp["condition"], hp["sampling"])


def load_upsampler(folder: str | Path, clip_checksum: str | None = None) -> UpsamplerSampler:
    """An exported upsampler, ready to sample; it reads z_i where built with dim > 0, so its CLIP is checked."""
    config, net = _load(folder, "upsampler", lambda sizes: Upsampler(UpsamplerConfig(**sizes)), clip_checksum)
    hp = config["hparams"]
    return UpsamplerSampler(net, hp["prediction_type"], hp["sampling"])
