"""Images out: [-1, 1] tensors to uint8, and PNG grids (training progress and every generation command)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] → (B, H, W, 3) uint8."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def save_grid(images: np.ndarray, path: str | Path, columns: int, cell: int = 128, gap: int = 2) -> Path:
    """Write (N, H, W, 3) uint8 images as a PNG grid, row-major, each cell scaled (nearest) to `cell` px."""
    path = Path(path)
    n = len(images)
    rows = -(-n // columns)
    canvas = Image.new("RGB", (columns * (cell + gap) + gap, rows * (cell + gap) + gap), (255, 255, 255))
    for i, image in enumerate(images):
        tile = Image.fromarray(np.asarray(image, dtype=np.uint8)).resize((cell, cell), Image.NEAREST)
        canvas.paste(tile, (gap + (i % columns) * (cell + gap), gap + (i // columns) * (cell + gap)))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    canvas.save(tmp, format="PNG")
    tmp.replace(path)
    return path
