"""CLIP encoders from open_clip, loaded from local files only unless a pretrained tag is asked for.

A model is named in one of three ways (`EncoderSpec`):
  - a folder in open_clip's own layout (`open_clip_config.json` + `open_clip_model.safetensors`), as
    `make train-clip` exports and as Hugging Face open_clip repositories ship: `model: models/synthetic/clip`
    (or `local-dir:models/synthetic/clip`);
  - an open_clip architecture with a weights file (an open_clip checkpoint or safetensors):
    `model: ViT-B-32, weights: /path/ViT-B-32.safetensors`;
  - an architecture with a pretrained tag, which downloads and so needs a machine that is online:
    `model: ViT-B-32, pretrained: laion2b_s34b_b79k`.
Preprocessing and tokenizer come from the model's own config. The checksum is of the weights as
loaded (names, shapes and fp32 values), so the same weights in .pt or .safetensors agree.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from embeddings.config import ConfigError
from embeddings.hardware import default_device, resolve_dtype

LOCAL_DIR = "local-dir:"


@dataclass(frozen=True)
class EncoderSpec:
    """How to find a CLIP: an open_clip folder, or an architecture plus weights file or tag."""

    model: str = "models/synthetic/clip"
    weights: str | None = None
    pretrained: str | None = None
    precision: str = "auto"  # auto: bf16 on GPUs and where embeddings/hardware.py measures it fast, else fp32
    device: str = "auto"

    def open_clip_name(self) -> str:
        """The name open_clip understands: 'local-dir:<folder>' for a folder, else the architecture."""
        if self.model.startswith(LOCAL_DIR):
            return self.model
        if Path(self.model).is_dir() or "/" in self.model:
            folder = Path(self.model)
            if not (folder / "open_clip_config.json").is_file():
                raise ConfigError(f"CLIP folder {folder} has no open_clip_config.json (is it trained and exported?)")
            return LOCAL_DIR + str(folder)
        return self.model


def weights_checksum(model: torch.nn.Module) -> str:
    """sha256 over parameter names, shapes and fp32 values, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


class ClipEncoder:
    """A loaded CLIP: image and text towers, preprocessing, tokenizer, and a description of itself."""

    def __init__(self, spec: EncoderSpec):
        import open_clip

        self.spec = spec
        name = spec.open_clip_name()
        if name.startswith(LOCAL_DIR):
            model, _, preprocess = open_clip.create_model_and_transforms(name)
        elif spec.weights:
            if not Path(spec.weights).is_file():
                raise ConfigError(f"CLIP weights file not found: {spec.weights}")
            model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=spec.weights)
        else:
            # A pretrained tag downloads (online machines only); no tag gives random weights.
            model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=spec.pretrained)
        self.checksum = weights_checksum(model)
        self.device = default_device() if spec.device == "auto" else torch.device(spec.device)
        self.dtype = resolve_dtype(spec.precision, self.device)
        self.model = model.to(self.device, self.dtype).eval()
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(name)
        self.dim = int(
            model.text_projection.shape[-1]
            if hasattr(model, "text_projection") and model.text_projection is not None
            else model.visual.output_dim
        )
        size = getattr(preprocess.transforms[0], "size", None)
        self.image_size = size if isinstance(size, int) or size is None else size[0]

    @property
    def info(self) -> dict:
        """What the manifest records about this encoder."""
        return {
            "model": self.spec.model,
            "weights": self.spec.weights,
            "pretrained": self.spec.pretrained,
            "checksum": self.checksum,
            "dim": self.dim,
            "compute_dtype": str(self.dtype).removeprefix("torch."),
            "normalized": True,
        }

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor, norms: bool = False):
        """(B, 3, H, W) preprocessed pixels → (B, D) unit-norm float32 image embeddings z_i; with `norms`,
        also the raw embeddings' norms (B,), from which published priors' raw vectors are recovered."""
        return _unit(self.model.encode_image(pixels.to(self.device, self.dtype)), norms)

    def preprocess_on_device(self, images: list) -> torch.Tensor:
        """open_clip's eval transform (shorter side → size, bicubic; centre crop; normalise) run on the
        encoder's device for (H, W, 3) uint8 arrays or (3, H, W) uint8 tensors (torchvision's decoder's, which
        may already be on the device): on a GPU node the CPUs then only decode, or only read."""
        images = [
            torch.from_numpy(np.ascontiguousarray(i)).permute(2, 0, 1) if isinstance(i, np.ndarray) else i
            for i in images
        ]
        size = self.image_size if isinstance(self.image_size, int) else self.image_size[0]
        normalize = self.preprocess.transforms[-1]
        mean = torch.tensor(normalize.mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(normalize.std, device=self.device).view(1, 3, 1, 1)
        out = torch.empty(len(images), 3, size, size, device=self.device)
        by_shape: dict[tuple, list[int]] = {}
        for i, image in enumerate(images):
            by_shape.setdefault(image.shape, []).append(i)
        for (_, h, w), rows in by_shape.items():  # one resize per distinct input size
            x = torch.stack([images[i].to(self.device) for i in rows]).float() / 255
            scale = size / min(h, w)
            new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
            if (new_h, new_w) != (h, w):
                x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False).clamp(
                    0, 1
                )
            top, left = (new_h - size) // 2, (new_w - size) // 2
            out[rows] = (x[:, :, top : top + size, left : left + size] - mean) / std
        return out

    @torch.inference_mode()
    def encode_texts(self, texts: list[str], norms: bool = False):
        """B captions → (B, D) unit-norm float32 text embeddings z_t; with `norms`, also the raw norms (B,)."""
        return _unit(self.model.encode_text(self.tokenizer(texts).to(self.device)), norms)

    def to(self, device: torch.device | str) -> ClipEncoder:
        """This encoder, its weights moved to `device` (they keep their dtype)."""
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    @torch.inference_mode()
    def encode_text_tokens(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token encodings of the text tower's last layer (B, T, W) and a mask of real tokens (B, T), on
        the encoder's device (a trainer on a GPU uses them there)."""
        tokens = self.tokenizer(texts).to(self.device)
        m = self.model
        if not hasattr(m, "token_embedding"):
            raise ValueError(f"{self.spec.model}: per-token encodings need open_clip's built-in text tower")
        x = m.token_embedding(tokens).to(self.dtype) + m.positional_embedding.to(self.dtype)
        x = m.ln_final(m.transformer(x, attn_mask=m.attn_mask))
        return x.float(), tokens != 0


def _unit(z: torch.Tensor, norms: bool):
    """Raw CLIP embeddings → unit vectors on the CPU (and their norms)."""
    z = z.float()
    unit = F.normalize(z, dim=-1).cpu()
    return (unit, z.norm(dim=-1).cpu()) if norms else unit


def spec_from_text(text: str) -> dict:
    """EncoderSpec fields from how a user names a CLIP on the command line (`make embed CLIP=...`):
    a folder in open_clip's layout (`models/mine/clip`), an architecture and a weights file
    (`ViT-B-32:/path/weights.safetensors`), or an architecture and a pretrained tag (`ViT-B-32:laion2b_s34b_b79k`,
    which downloads)."""
    if Path(text).is_dir():
        return {"model": text}
    arch, _, rest = text.partition(":")
    if not rest:
        raise ConfigError(
            f"CLIP {text!r}: name a folder in open_clip's layout, ARCH:WEIGHTS_FILE, or ARCH:PRETRAINED_TAG "
            "(an architecture alone would have random weights)"
        )
    return {"model": arch, "weights": rest} if Path(rest).is_file() else {"model": arch, "pretrained": rest}


def load_encoder(spec: EncoderSpec | dict | None = None) -> ClipEncoder:
    """Load a CLIP from a spec (or a dict of its fields; unknown fields are a ConfigError)."""
    if spec is None:
        spec = EncoderSpec()
    if isinstance(spec, dict):
        unknown = set(spec) - set(EncoderSpec.__dataclass_fields__)
        if unknown:
            raise ConfigError(
                f"encoder: unknown key {sorted(unknown)[0]!r}; known: {', '.join(EncoderSpec.__dataclass_fields__)}"
            )
        spec = EncoderSpec(**spec)
    return ClipEncoder(spec)


def save_clip_folder(
    model: torch.nn.Module,
    model_cfg: dict,
    folder: str | Path,
    preprocess_cfg: dict | None = None,
    extra: dict | None = None,
) -> Path:
    """Export a CLIP in open_clip's folder layout (open_clip_config.json + open_clip_model.safetensors).

    open_clip itself loads the folder (`local-dir:`), so the embed job needs no code of ours to read
    it. Weights are stored as they are (dtype included).
    """
    import json

    import open_clip
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    preprocess_cfg = preprocess_cfg or {
        "mean": list(open_clip.OPENAI_DATASET_MEAN),
        "std": list(open_clip.OPENAI_DATASET_STD),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    tmp = folder / ".open_clip_model.safetensors.tmp"
    save_file(state, str(tmp))
    tmp.replace(folder / "open_clip_model.safetensors")
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg, **(extra or {})}
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=1) + "\n")
    return folder
