"""Prior training throughput against DALLE2-pytorch, and the datamodule's read rate against embedding-reader.

    python bench/prior.py [--width 512 --depth 6 --heads 8 --batch 32 --steps 30] [--dalle2]
                          [--embeddings data/synthetic/embeddings]

1. ours: `training.prior_net.DiffusionPrior` (diffusers' PriorTransformer) with 77 per-token text encodings, one AdamW training
   step at a time (forward, MSE on x_0, backward, step), in the precision embeddings.hardware picks;
   samples/s over `--steps` steps after 3 warm-up steps, and the loss after them;
2. with --dalle2: DALLE2-pytorch's `DiffusionPrior` + `DiffusionPriorNetwork` at the same width,
   depth, heads, batch and text length (max_text_len=77), in its own venv (bench/.venv-dalle2),
   on the same random data; ratio = ours / theirs (target ≥ 1.5). Its forward multiplies the caller's
   image embedding by √D in place, so it is handed a copy each step (reusing one tensor compounded the
   scale, √D per step, until its loss was NaN: what earlier runs of this bench measured);
3. read rate: rows/s of our PriorDataModule stream over an embedding folder against
   embedding-reader reading the same rows exported in clip-retrieval's layout (target ≥ 1).
Results are appended to bench/results/prior.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from embeddings.hardware import resolve_dtype  # noqa: E402

RESULTS = Path(__file__).parent / "results"
DALLE2_VENV = Path(__file__).parent / ".venv-dalle2"

DALLE2_STEP = r"""
import json, sys, time, torch
from dalle2_pytorch import DiffusionPrior, DiffusionPriorNetwork
a = json.loads(sys.argv[1]); torch.manual_seed(0); torch.set_num_threads(a["threads"])
net = DiffusionPriorNetwork(dim=a["dim"], depth=a["depth"], dim_head=a["width"] // a["heads"], heads=a["heads"],
                            max_text_len=77, num_timesteps=1000)
prior = DiffusionPrior(net=net, clip=None, image_embed_dim=a["dim"], timesteps=1000, cond_drop_prob=0.1,
                       condition_on_text_encodings=True, predict_x_start=True)
opt = torch.optim.AdamW(prior.parameters(), lr=3e-4)
data = torch.load(a["data"], weights_only=True)
def step():
    # a fresh copy each step: DiffusionPrior.forward scales image_embed in place (image_embed *= scale)
    loss = prior(text_embed=data["z_t"], image_embed=data["z_i"].clone(), text_encodings=data["tokens"])
    opt.zero_grad(); loss.backward(); opt.step(); return loss.item()
for _ in range(3): step()
start = time.perf_counter(); losses = [step() for _ in range(a["steps"])]
print(json.dumps({"samples_per_s": a["steps"] * a["batch"] / (time.perf_counter() - start), "loss": losses[-1]}))
"""


def ours(args, data) -> dict:
    from training.conditioning import Caption, drop_caption
    from training.diffusion import noise_schedule, sample_timesteps
    from training.prior_net import DiffusionPrior, PriorConfig

    torch.manual_seed(0)
    dtype = resolve_dtype(args.precision, torch.device("cpu"))
    net = DiffusionPrior(
        PriorConfig(
            dim=args.width,
            width=args.width,
            depth=args.depth,
            heads=args.heads,
            text_token_width=args.width,
            max_text_tokens=77,
        )
    )
    opt = torch.optim.AdamW(net.parameters(), lr=3e-4)
    schedule = noise_schedule("sample")
    mask = torch.ones(data["tokens"].shape[:2], dtype=torch.bool)
    empty = Caption(torch.zeros(1, args.width), data["tokens"][:1] * 0, mask[:1])  # stands in for the encoded ""

    def step() -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            x_0 = net.normalise(data["z_i"])
            t = sample_timesteps(args.batch)
            x_t = schedule.add_noise(x_0, torch.randn_like(x_0), t)
            c = drop_caption(Caption(data["z_t"], data["tokens"], mask), torch.rand(args.batch) < 0.1, empty)
            loss = F.mse_loss(net(x_t, t, c.z_t, c.tokens, c.mask).float(), x_0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    for _ in range(3):
        step()
    start = time.perf_counter()
    losses = [step() for _ in range(args.steps)]
    return {
        "samples_per_s": args.steps * args.batch / (time.perf_counter() - start),
        "loss": losses[-1],
        "dtype": str(dtype),
    }


def read_rates(embeddings_dir: Path) -> dict:
    from embedding_reader import EmbeddingReader

    from pipelines.clip_retrieval import export_clip_retrieval
    from training.prior import PriorDataModule

    stream = PriorDataModule(str(embeddings_dir), seed=0, batch_size=256).train_stream(0)
    start = time.perf_counter()
    rows = sum(1 for _ in stream)
    ours_rate = rows / (time.perf_counter() - start)
    with tempfile.TemporaryDirectory() as tmp:
        export_clip_retrieval(embeddings_dir, tmp)
        reader = EmbeddingReader(
            f"{tmp}/img_emb",
            file_format="parquet_npy",
            metadata_folder=f"{tmp}/metadata",
            meta_columns=["key", "caption"],
        )
        start = time.perf_counter()
        total = sum(len(v) for v, _ in reader(batch_size=256, start=0, end=reader.count, show_progress=False))
        theirs = total / (time.perf_counter() - start)
    return {
        "ours_rows_per_s": round(ours_rate),
        "embedding_reader_rows_per_s": round(theirs),
        "read_ratio": round(ours_rate / theirs, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--dalle2", action="store_true")
    parser.add_argument(
        "--precision",
        default="auto",
        help="ours: auto (embeddings.hardware's choice), fp32 (as DALLE2-pytorch runs) or bf16",
    )
    parser.add_argument("--embeddings", default="data/synthetic/embeddings")
    args = parser.parse_args()

    torch.manual_seed(0)
    z_i = F.normalize(torch.randn(args.batch, args.width), dim=-1)
    data = {
        "z_i": z_i,
        "z_t": F.normalize(z_i + 0.5 * torch.randn_like(z_i), dim=-1),
        "tokens": torch.randn(args.batch, 77, args.width),
    }
    result = {
        "width": args.width,
        "depth": args.depth,
        "heads": args.heads,
        "batch": args.batch,
        "text_tokens": 77,
        "precision": args.precision,
        "cpus": os.cpu_count(),
        "ours": ours(args, data),
    }
    if args.dalle2:
        python = DALLE2_VENV / "bin" / "python"
        if not python.exists():
            raise SystemExit(
                f"{python} missing: python3 -m venv {DALLE2_VENV} && {DALLE2_VENV}/bin/pip install "
                "dalle2-pytorch==1.15.6 torch==2.14.1 torchvision==0.29.1"
            )
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(data, f"{tmp}/data.pt")
            spec = dict(vars(args), dim=args.width, data=f"{tmp}/data.pt", threads=torch.get_num_threads())
            out = subprocess.run(
                [str(python), "-c", DALLE2_STEP, json.dumps(spec)], capture_output=True, text=True, check=True
            )
        result["dalle2_pytorch"] = json.loads(out.stdout.strip().splitlines()[-1])
        result["speedup"] = round(result["ours"]["samples_per_s"] / result["dalle2_pytorch"]["samples_per_s"], 2)
    if Path(args.embeddings).is_dir():
        result["read"] = read_rates(Path(args.embeddings))
    print(json.dumps(result, indent=1))
    RESULTS.mkdir(exist_ok=True)
    out_file = RESULTS / "prior.json"
    history = json.loads(out_file.read_text()) if out_file.exists() else []
    out_file.write_text(json.dumps(history + [result], indent=1) + "\n")


if __name__ == "__main__":
    main()
