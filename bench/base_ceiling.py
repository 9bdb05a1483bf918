"""What a perfect 16 px base decoder would score: real scenes reduced to the decoder's size, brought back to
64 px by the trained upsampler (and by bicubic alone), read by the pixel checker.

    python bench/base_ceiling.py [--models models/synthetic] [--images 128]

Shape accuracy here bounds what any base decoder of this size can reach through this upsampler.
Run after `make data` and `make train-upsampler` (it reads data/synthetic/urls.parquet).
"""

from __future__ import annotations

import argparse

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

from pipelines import shapes
from training.generate import UnCLIP
from training.grid import to_uint8

ATTRIBUTES = ("colour", "shape", "size", "position")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="models/synthetic")
    parser.add_argument("--urls", default="data/synthetic/urls.parquet")
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8, help="upsampler steps (make eval's default)")
    args = parser.parse_args()
    unclip = UnCLIP.load(args.models)
    size = unclip.decoder.config.image_size
    rows = [r for r in pq.read_table(args.urls).to_pylist() if r["split"] in ("val", "heldout") and r["n_objects"] == 1]
    rows = [rows[i] for i in np.random.default_rng(0).choice(len(rows), min(args.images, len(rows)), replace=False)]
    objects = [shapes.ShapeObject(r["shape"], r["colour"], r["size"], r["position"]) for r in rows]
    full = [shapes.render(shapes.Scene(r["background"], (o,)), 64) for r, o in zip(rows, objects)]
    small = [np.asarray(image.resize((size, size), Image.BOX)) for image in full]  # as the decoder's data
    x = torch.from_numpy(np.stack(small)).permute(0, 3, 1, 2).float() / 127.5 - 1
    upsampled = to_uint8(unclip.upsampler.sample(x, list(range(len(rows))), None, steps=args.steps))
    bicubic = [np.asarray(Image.fromarray(s).resize((64, 64), Image.BICUBIC)) for s in small]
    for name, images in (
        ("real 64 px", [np.asarray(i) for i in full]),
        (f"{size} px + bicubic", bicubic),
        (f"{size} px + upsampler ({args.steps} steps)", list(upsampled)),
    ):
        checks = [shapes.attribute_accuracy(image, o) for image, o in zip(images, objects)]
        print(f"{name:<28}" + "  ".join(f"{a} {np.mean([c[a] for c in checks]):.1%}" for a in ATTRIBUTES))


if __name__ == "__main__":
    main()
