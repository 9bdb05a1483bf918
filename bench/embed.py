"""Embed job throughput against the bare encoder, and against clip-retrieval, on the same shards.

    python bench/embed.py [--config configs/data/synthetic.yaml] [--model ViT-B-32] [--samples 2000]
                          [--clip-retrieval]   # also run clip-retrieval 2.45 in bench/.venv-clip-retrieval

1. pipeline: `pipelines.embed.embed` on the first shards of the config's data set (Ray, decode,
   image and text towers, Parquet writes), samples/s over the job's wall time after Ray is up;
2. bare: the same encoder's image+text forward pass on pre-decoded tensors, same batch size;
   pipeline efficiency = 1 / 2 (target ≥ 0.8), over the job's wall time and in the steady state
   (the actors' own seconds per shard, without Ray and model start-up);
3. agreement: our stored vectors (compute dtype chosen by embeddings.hardware) against an fp32
   reference on the same images (target cosine ≥ 0.999);
4. with --clip-retrieval: `clip-retrieval inference` on the same tars with the same weights
   (`open_clip:<model>/<checkpoint>`), batch 64, 2 preprocessing workers; ratio = ours / theirs.
The model's weights are random (nothing is downloaded), saved once to bench/results/<model>-random.pt.
Results are appended to bench/results/embed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from embeddings import store  # noqa: E402
from embeddings.encoders import load_encoder  # noqa: E402
from embeddings.tars import finished_tars, iter_tar_samples  # noqa: E402
from pipelines.data_config import DEFAULT_DATA, load_data_config  # noqa: E402

RESULTS = Path(__file__).parent / "results"
CR_VENV = Path(__file__).parent / ".venv-clip-retrieval"


def random_checkpoint(model: str) -> Path:
    """A random-weight open_clip checkpoint for `model`, made once and reused (seeded)."""
    import open_clip

    path = RESULTS / f"{model}-random.pt"
    if not path.exists():
        torch.manual_seed(0)
        RESULTS.mkdir(exist_ok=True)
        torch.save({"state_dict": open_clip.create_model(model).state_dict()}, path)
    return path


def subset(shards: list[Path], samples: int, folder: Path) -> list[Path]:
    """Copy the first shards (tar + parquet + stats) until `samples` samples are covered."""
    folder.mkdir(parents=True, exist_ok=True)
    chosen, total = [], 0
    for tar in shards:
        if total >= samples:
            break
        for suffix in (".tar", ".parquet", "_stats.json"):
            src = tar.with_name(tar.stem + suffix)
            if src.exists():
                shutil.copy(src, folder / src.name)
        chosen.append(folder / tar.name)
        total += sum(1 for s in iter_tar_samples(tar) if s["image"] is not None)
    return chosen


def bare_throughput(encoder, tars: list[Path], batch_size: int, limit: int = 512) -> float:
    """Image+text samples/s of the encoder alone on pre-decoded, preprocessed inputs."""
    from training.data import decode_image

    samples = [s for tar in tars for s in iter_tar_samples(tar) if s["image"] is not None][:limit]
    pixels = torch.stack([encoder.preprocess(decode_image(s["image"])) for s in samples])
    captions = [s["caption"] for s in samples]
    encoder.encode_images(pixels[:batch_size]), encoder.encode_texts(captions[:batch_size])  # warm-up
    start = time.perf_counter()
    for i in range(0, len(samples), batch_size):
        encoder.encode_images(pixels[i : i + batch_size])
        encoder.encode_texts(captions[i : i + batch_size])
    return len(samples) / (time.perf_counter() - start)


def agreement(encoder_spec: dict, embeddings_dir: Path, tars: list[Path], n: int = 128) -> float:
    """Minimum cosine between stored image vectors and an fp32 recomputation of the same images."""
    from training.data import decode_image

    reference = load_encoder(dict(encoder_spec, precision="fp32"))
    samples = [s for s in iter_tar_samples(tars[0]) if s["image"] is not None][:n]
    z = reference.encode_images(torch.stack([reference.preprocess(decode_image(s["image"])) for s in samples])).numpy()
    table = store.read_table(embeddings_dir, columns=["key", "image_embedding"])
    stored = dict(zip(table.column("key").to_pylist(), store.arrow_to_vectors(table.column("image_embedding"))))
    ours = np.stack([stored[s["key"]] for s in samples])
    ours /= np.linalg.norm(ours, axis=1, keepdims=True)
    return float((ours * z).sum(1).min())


def run_clip_retrieval(tars: list[Path], model: str, checkpoint: Path, out: Path, samples: int) -> float:
    """clip-retrieval inference on the same tars in its own venv; samples/s over its wall time."""
    exe = CR_VENV / "bin" / "clip-retrieval"
    if not exe.exists():
        raise SystemExit(
            f"{exe} missing: python3 -m venv {CR_VENV} && {CR_VENV}/bin/pip install "
            "clip-retrieval==2.45.0 'setuptools<70' torch==2.14.1 torchvision==0.29.1"
        )
    spec = "{" + ",".join(t.stem for t in tars) + "}"
    cmd = [
        str(exe),
        "inference",
        "--input_dataset",
        str(tars[0].parent / f"{spec}.tar"),
        "--input_format",
        "webdataset",
        "--output_folder",
        str(out),
        "--clip_model",
        f"open_clip:{model}/{checkpoint}",
        "--batch_size",
        "64",
        "--num_prepro_workers",
        "2",
        "--enable_text",
        "True",
        "--enable_metadata",
        "True",
        "--enable_wandb",
        "False",
    ]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1"))
    return samples / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=DEFAULT_DATA, help="the data set: a name or a config path")
    parser.add_argument("--model", default="ViT-B-32", help="open_clip architecture (random weights) or a CLIP folder")
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--clip-retrieval", action="store_true")
    args = parser.parse_args()

    import ray

    config = load_data_config(args.config)
    work = Path(tempfile.mkdtemp(prefix="unclip-bench-embed-"))
    tars = subset(finished_tars(config.layout.shards), args.samples, work / "shards")
    if Path(args.model).is_dir():
        spec = {"model": args.model}
    else:
        spec = {"model": args.model, "weights": str(random_checkpoint(args.model))}
    encoder = load_encoder(spec)
    result = {
        "model": args.model,
        "compute_dtype": str(encoder.dtype),
        "cpus": os.cpu_count(),
        "batch_size": args.batch_size,
    }
    result["bare_samples_per_s"] = round(bare_throughput(encoder, tars, args.batch_size), 1)
    del encoder

    from pipelines.embed import embed

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    start = time.perf_counter()
    manifest = embed(work / "shards", work / "embeddings", encoder=spec, batch_size=args.batch_size)
    elapsed = time.perf_counter() - start
    ray.shutdown()
    result["samples"] = manifest["rows"]
    result["pipeline_samples_per_s"] = round(manifest["rows"] / elapsed, 1)
    result["pipeline_efficiency"] = round(result["pipeline_samples_per_s"] / result["bare_samples_per_s"], 3)
    # Steady state: the actors' own time per shard (read, decode, both towers, write), start-up excluded.
    busy = sum(r["seconds"] for r in manifest["records"].values())
    result["steady_samples_per_s"] = round(manifest["rows"] / busy, 1)
    result["steady_efficiency"] = round(result["steady_samples_per_s"] / result["bare_samples_per_s"], 3)
    result["min_cosine_vs_fp32"] = round(agreement(spec, work / "embeddings", tars), 5)
    if args.clip_retrieval:
        cr = run_clip_retrieval(tars, args.model, Path(spec["weights"]), work / "clip_retrieval", manifest["rows"])
        result["clip_retrieval_samples_per_s"] = round(cr, 1)
        result["speedup_vs_clip_retrieval"] = round(result["pipeline_samples_per_s"] / cr, 2)
    print(json.dumps(result, indent=1))
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "embed.json"
    history = json.loads(out.read_text()) if out.exists() else []
    out.write_text(json.dumps(history + [result], indent=1) + "\n")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
