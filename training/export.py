"""Exports: a folder per trained model (models/<name>/{prior,decoder,upsampler}/) holding
`<kind>.safetensors` (the EMA weights) and `config.json` (sizes, sampling defaults, metrics, and the
CLIP it was trained against). Loading checks that CLIP's checksum and never unpickles anything.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from embeddings import store
from embeddings.config import ConfigError

CLIP_FIELDS = ("model", "weights", "pretrained", "checksum")


def save_export(folder: str | Path, kind: str, net: torch.nn.Module, config: dict, encoder: dict) -> Path:
    """Write `<kind>.safetensors` and config.json (with the CLIP record of `encoder`) atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    tmp = folder / f".{kind}.safetensors.tmp"
    save_file(state, str(tmp))
    tmp.replace(folder / f"{kind}.safetensors")
    store.write_json(folder / "config.json", dict(config, kind=kind, clip={k: encoder.get(k) for k in CLIP_FIELDS}))
    return folder


def load_export(
    folder: str | Path, kind: str, clip_checksum: str | None = None
) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, state dict) of an export; a CLIP checksum that differs from the recorded one is an error."""
    folder = Path(folder)
    if not (folder / "config.json").is_file() or not (folder / f"{kind}.safetensors").is_file():
        raise FileNotFoundError(f"no exported {kind} in {folder}: run `make train-{kind}` first")
    config = json.loads((folder / "config.json").read_text())
    recorded = config["clip"].get("checksum")
    if clip_checksum is not None and recorded != clip_checksum:
        raise ConfigError(
            f"the {kind} in {folder} was trained against another CLIP (checksum {str(recorded)[:12]}…, "
            f"not {clip_checksum[:12]}…): retrain it on embeddings of this CLIP"
        )
    return config, load_file(str(folder / f"{kind}.safetensors"))
