"""Published unCLIP weights in diffusers' layouts: reading them into our networks, checked, and writing ours out.

A published prior is a `PriorTransformer` folder (`config.json` + `diffusion_pytorch_model.*`), alone
or as the `prior/` folder of a pipeline (Karlo's UnCLIPPipeline, Kandinsky 2.2's prior pipeline: a
folder with `model_index.json`). Its sizes become our PriorConfig (`prior_sizes`), and its weights
load only when every tensor the network holds is present with its shape and nothing else is there:
a renamed, missing, extra or reshaped tensor is an error that names it (never `strict=False`, the
silent failure reported against DALLE2-pytorch and Kandinsky).

Published priors carry clip_mean / clip_std of *raw* CLIP vectors, so a prior started from them
trains and samples in raw space (`clip_space: raw`): the shards' unit vectors times their norm columns.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch

from embeddings.config import ConfigError

WEIGHTS = "diffusion_pytorch_model"


def prior_folder(path: str | Path) -> Path:
    """The PriorTransformer folder of `path`: itself, or the `prior/` of a pipeline folder."""
    path = Path(path)
    if (path / "model_index.json").is_file():
        if not (path / "prior" / "config.json").is_file():
            raise ConfigError(f"init_from {path}: a pipeline folder without a prior/ (config.json) to start from")
        return path / "prior"
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"init_from {path}: not a diffusers folder (no model_index.json or config.json); give a Karlo or "
            "Kandinsky 2.2 prior folder as saved by diffusers"
        )
    return path


def read_prior_config(path: str | Path) -> dict:
    """The diffusers config of a published prior (`path` as `prior_folder` takes it)."""
    folder = prior_folder(path)
    config = json.loads((folder / "config.json").read_text())
    if config.get("_class_name") != "PriorTransformer":
        raise ConfigError(f"init_from {folder}: a {config.get('_class_name')!r}, not a PriorTransformer")
    return config


def prior_sizes(config: dict, where: str = "init_from") -> dict:
    """PriorConfig fields of a PriorTransformer config (diffusers' defaults for keys older folders omit)."""
    from diffusers import PriorTransformer

    from training.prior_net import PriorConfig, transformer_kwargs

    defaults = {k: v.default for k, v in _signature(PriorTransformer.__init__).items()}
    c = {**defaults, **{k: v for k, v in config.items() if k in defaults}}
    built = transformer_kwargs(PriorConfig())
    for key, value in ((k, built[k]) for k in ("additional_embeddings", "added_emb_type")):
        if c[key] != value:
            raise ConfigError(f"{where}: {key} = {c[key]!r}; this code builds priors with {value!r}")
    dim, width = c["embedding_dim"], c["num_attention_heads"] * c["attention_head_dim"]
    for key, expected in (("embedding_proj_dim", dim), ("clip_embed_dim", dim), ("time_embed_dim", width)):
        if c[key] not in (None, expected):
            raise ConfigError(f"{where}: {key} = {c[key]} differs from {expected}, which this code assumes")
    tokens = c["num_embeddings"] > 0
    if tokens and c["encoder_hid_proj_type"] != "linear":
        raise ConfigError(f"{where}: text tokens without a linear encoder_hid_proj are not a published layout")
    sizes = PriorConfig(
        dim=dim,
        width=width,
        depth=c["num_layers"],
        heads=c["num_attention_heads"],
        text_token_width=dim if tokens else 0,
        max_text_tokens=c["num_embeddings"] if tokens else PriorConfig.max_text_tokens,
        dropout=c["dropout"],
        time_embed_act_fn=c["time_embed_act_fn"],
        norm_in_type=c["norm_in_type"],
        embedding_proj_norm_type=c["embedding_proj_norm_type"],
        clip_space="raw",
    )
    return sizes.to_dict()


def checked_prior_sizes(path: str | Path, configured: dict | None) -> dict:
    """The sizes of the published prior at `path`, with the config's `prior:` keys as assertions: a key set
    there that differs from the folder's is an error (only `dropout` may be changed for fine-tuning)."""
    folder = prior_folder(path)
    sizes = prior_sizes(read_prior_config(folder), f"init_from {folder}")
    for key, value in (configured or {}).items():
        if key not in sizes:
            raise ConfigError(f"prior.{key}: unknown key")
        if key != "dropout" and value != sizes[key]:
            raise ConfigError(
                f"prior.{key} is {value!r} but the prior at init_from {folder} has {sizes[key]!r}: drop the key "
                "(a fine-tuned prior keeps the published sizes)"
            )
    return {**sizes, **(configured or {})}


def _signature(fn) -> dict:
    return {n: p for n, p in inspect.signature(fn).parameters.items() if n != "self"}


def read_weights(folder: str | Path, name: str = WEIGHTS) -> dict[str, torch.Tensor]:
    """The tensors of a diffusers model folder: `<name>.safetensors`, sharded safetensors (with their
    `.index.json`), or a `<name>.bin` (read with weights_only: nothing is unpickled but tensors)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    single, index, legacy = (
        folder / f"{name}{suffix}" for suffix in (".safetensors", ".safetensors.index.json", ".bin")
    )
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {k: v for f in files for k, v in load_file(str(folder / f)).items()}
    if legacy.is_file():
        return torch.load(legacy, map_location="cpu", weights_only=True)
    raise ConfigError(f"{folder}: no {name}.safetensors (or sharded, or .bin) weights")


def load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Load `state` into `module` only if the names and shapes agree exactly; otherwise name what differs."""
    held = module.state_dict()
    missing = sorted(set(held) - set(state))
    unexpected = sorted(set(state) - set(held))
    reshaped = sorted(k for k in set(held) & set(state) if tuple(held[k].shape) != tuple(state[k].shape))
    problems = []
    if missing:
        problems.append(f"missing {', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(f"unexpected {', '.join(unexpected[:5])}{' …' if len(unexpected) > 5 else ''}")
    for k in reshaped[:5]:
        problems.append(f"{k} has shape {tuple(state[k].shape)}, the network holds {tuple(held[k].shape)}")
    if problems:
        raise ConfigError(f"{where}: the weights do not fit the network: " + "; ".join(problems))
    module.load_state_dict(state, strict=True)


def load_published_prior(net: torch.nn.Module, path: str | Path) -> None:
    """Fill our DiffusionPrior `net` with a published prior's weights; its sizes must be the folder's."""
    from training.prior_net import PriorConfig, transformer_kwargs

    folder = prior_folder(path)
    sizes = prior_sizes(read_prior_config(folder), f"init_from {folder}")
    there = dict(transformer_kwargs(PriorConfig(**sizes)), clip_space=sizes["clip_space"])
    here = dict(transformer_kwargs(net.config), clip_space=net.config.clip_space)
    differ = [k for k in there if k != "dropout" and there[k] != here[k]]
    if differ:
        raise ConfigError(f"init_from {folder}: {differ[0]} is {here[differ[0]]!r} here and {there[differ[0]]!r} there")
    load_strict(net.transformer, read_weights(folder), f"init_from {folder}")


def decoder_sizes(path: str | Path) -> dict:
    """DecoderConfig fields (layout karlo) of a Karlo pipeline folder's decoder/ and text_proj/. Every key of the
    decoder's config.json must be what Karlo's layout (decoder_net.karlo_unet_kwargs) builds at those sizes, or
    diffusers' default where the layout says nothing: a switch that differs is refused by name (weights alone
    cannot show it)."""
    from diffusers import UNet2DConditionModel

    from training.decoder_net import DecoderConfig, karlo_unet_kwargs

    path = Path(path)
    for part in ("decoder", "text_proj"):
        if not (path / part / "config.json").is_file():
            raise ConfigError(f"{path}: no {part}/config.json (Karlo's layout has decoder/ and text_proj/)")
    unet = json.loads((path / "decoder" / "config.json").read_text())
    proj = json.loads((path / "text_proj" / "config.json").read_text())
    head = unet.get("attention_head_dim")
    if not isinstance(head, int):
        raise ConfigError(f"{path}/decoder: attention_head_dim {head!r} per block; this code builds one head width")
    sizes = DecoderConfig(
        image_size=unet["sample_size"],
        dim=proj["clip_embeddings_dim"],
        channels=list(unet["block_out_channels"]),
        layers_per_block=unet["layers_per_block"],
        head_width=head,
        context_tokens=proj["clip_extra_context_tokens"],
        context_width=unet["cross_attention_dim"],
        text_token_width=proj["clip_embeddings_dim"],
        norm_groups=unet["norm_num_groups"],
        layout="karlo",
        learned_variance=unet.get("out_channels") == 6,
    )
    expected = {k: v.default for k, v in _signature(UNet2DConditionModel.__init__).items()}
    expected.update(karlo_unet_kwargs(sizes))
    plain = lambda v: list(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
    for key, value in unet.items():
        if not key.startswith("_") and key in expected and plain(value) != plain(expected[key]):
            raise ConfigError(f"{path}/decoder: {key} = {value!r}, where Karlo's layout has {expected[key]!r}")
    if proj.get("time_embed_dim") != 4 * sizes.channels[0] or proj.get("cross_attention_dim") != sizes.context_width:
        raise ConfigError(f"{path}/text_proj: its widths do not fit the decoder's")
    return sizes.to_dict()


def checked_decoder_sizes(path: str | Path, configured: dict | None) -> dict:
    """The sizes of the Karlo decoder at `path` (decoder_sizes), with the config's `decoder:` keys as assertions:
    a key set there that differs from the folder's is an error (a fine-tuned decoder keeps the published sizes)."""
    sizes = decoder_sizes(path)
    for key, value in (configured or {}).items():
        if key not in sizes:
            raise ConfigError(f"decoder.{key}: unknown key")
        if value != sizes[key]:
            raise ConfigError(
                f"decoder.{key} is {value!r} but the decoder at init_from {path} has {sizes[key]!r}: drop the key "
                "(a fine-tuned decoder keeps the published sizes)"
            )
    return sizes


def load_published_decoder(net: torch.nn.Module, path: str | Path) -> None:
    """Fill our KarloDecoder `net` with a Karlo folder's decoder/ and text_proj/ weights (strict, by name)."""
    path = Path(path)
    load_strict(net.text_proj, read_weights(path / "text_proj"), f"{path}/text_proj")
    load_strict(net.unet, read_weights(path / "decoder"), f"{path}/decoder")


def upsampler_folder(path: str | Path) -> Path:
    """The UNet2DModel folder of `path`: a Karlo pipeline's super_res_first/, or the folder itself."""
    path = Path(path)
    folder = path / "super_res_first" if (path / "model_index.json").is_file() else path
    if not (folder / "config.json").is_file():
        raise ConfigError(f"init_from {path}: no super_res_first/ (Karlo's layout) or UNet2DModel config.json")
    return folder


def upsampler_sizes(path: str | Path, configured: dict | None = None) -> dict:
    """UpsamplerConfig fields of a published super-resolution UNet2DModel (its whole config under `unet`); the
    config's own `upsampler:` keys may set `factor` and must otherwise agree."""
    from training.decoder_net import UpsamplerConfig

    folder = upsampler_folder(path)
    unet = json.loads((folder / "config.json").read_text())
    if unet.get("_class_name") != "UNet2DModel":
        raise ConfigError(f"init_from {folder}: a {unet.get('_class_name')!r}, not a UNet2DModel")
    sizes = {
        "image_size": unet["sample_size"],
        "channels": list(unet["block_out_channels"]),
        "layers_per_block": unet["layers_per_block"],
        "norm_groups": unet["norm_num_groups"],
        "unet": {k: v for k, v in unet.items() if not k.startswith("_")},
    }
    for key, value in (configured or {}).items():
        if key == "factor":
            sizes[key] = value
        elif not (key == "dim" and not value) and sizes.get(key, ...) != value:
            raise ConfigError(f"upsampler.{key} = {value!r}: the upsampler at init_from {folder} fixes its sizes")
    return UpsamplerConfig(**sizes).to_dict()


def load_published_upsampler(net: torch.nn.Module, path: str | Path) -> None:
    """Fill our Upsampler `net` (built from `upsampler_sizes`) with the published UNet's weights, strictly."""
    folder = upsampler_folder(path)
    load_strict(net.unet, read_weights(folder), f"init_from {folder}")


def statistics_fit(net: torch.nn.Module, z_raw: torch.Tensor) -> float:
    """The spread (std over all values) of raw image embeddings (N, D) in the prior's normalised space: about
    1 where the data was embedded by the CLIP whose statistics the published prior carries."""
    with torch.no_grad():
        return float(net.normalise(z_raw.float()).std())


def save_prior_diffusers(net: torch.nn.Module, folder: str | Path) -> Path:
    """Write our prior as a diffusers PriorTransformer folder (config.json + safetensors) that diffusers,
    Karlo's and Kandinsky's pipelines and `init_from` load."""
    folder = Path(folder)
    net.transformer.save_pretrained(folder, safe_serialization=True)
    return folder
