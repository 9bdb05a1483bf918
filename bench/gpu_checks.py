"""The GPU timings the issues ask for, in one short script for a lent GPU machine (no Ray there).

    python bench/gpu_checks.py OUT_DIR

1. embed path: ViT-L-14 (random weights, bf16) fed by the embed job's own decode-and-preprocess
   path (`pipelines.embed.ShardEmbedder.process` on a webdataset tar of 256 px JPEGs), against the
   same encoder's bare forward pass on pre-made tensors; images/s and the share of the GPU's bf16
   peak (ViT-L-14 at 224 px ≈ 162 GFLOP per image, counting a multiply-add as 2);
   and the same with decoding on the CPU but resize/crop/normalise on the GPU.
2. prior: the full-size prior network (12 layers, width 768, 12 heads, 77 text tokens) training
   step in bf16 autocast with AdamW: samples/s.
Writes OUT_DIR/gpu_checks.json.
"""

from __future__ import annotations

import io
import json
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

VIT_L14_GFLOP = 162.0
H200_BF16_PEAK_TFLOPS = 989.0  # dense, data sheet; ~790 measured on an 8192³ matmul here


def make_tar(path: Path, n: int, size: int = 256) -> None:
    from pipelines import shapes

    rng = np.random.default_rng(0)
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            scene = shapes.sample_scene(rng, n_objects=1 + i % 2)
            for ext, data in (
                ("jpg", shapes.encode_jpeg(shapes.render(scene, size))),
                ("txt", shapes.caption(scene).encode()),
            ):
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def timed(fn, repeats: int = 1) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def embed_checks(work: Path, n: int = 4096, batch: int = 256) -> dict:
    from pipelines.embed import ShardEmbedder
    from training.data import decode_image

    make_tar(work / "00000.tar", n)
    embedder = ShardEmbedder(
        {"model": "ViT-L-14", "precision": "bf16", "device": "cuda"},
        str(work / "out"),
        batch_size=batch,
        decode_threads=14,
    )
    encoder = embedder.encoder
    pixels = torch.randn(batch, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
    texts = ["a small red circle at the top left on a gray background"] * batch
    encoder.encode_images(pixels), encoder.encode_texts(texts)  # warm-up
    image_s = timed(lambda: encoder.model.encode_image(pixels), 10)
    text_s = timed(lambda: encoder.model.encode_text(encoder.tokenizer(texts).cuda()), 10)
    embedder.process(str(work / "00000.tar"))  # warm-up of the whole path
    (work / "out" / "00000_record.json").unlink()
    path_s = timed(lambda: embedder.process(str(work / "00000.tar")))

    # Decode on the CPU threads, resize + crop + normalise on the GPU.
    from embeddings.tars import iter_tar_samples

    samples = [s for s in iter_tar_samples(work / "00000.tar")]
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073], device="cuda").view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711], device="cuda").view(1, 3, 1, 1)

    def gpu_preprocess_run():
        chunks = [samples[i : i + batch] for i in range(0, len(samples), batch)]
        decoded = embedder.pool.map(
            lambda c: torch.from_numpy(np.stack([np.asarray(decode_image(s["image"])) for s in c])), chunks
        )
        for chunk in decoded:
            x = chunk.cuda(non_blocking=True).permute(0, 3, 1, 2).float() / 255
            x = F.interpolate(x, size=224, mode="bicubic", antialias=True, align_corners=False)
            with torch.no_grad():
                encoder.model.encode_image(((x - mean) / std).to(torch.bfloat16))

    gpu_pre_s = timed(gpu_preprocess_run)
    bare_ips = batch / image_s
    return {
        "model": "ViT-L-14 (random weights), bf16, 224 px, batch 256",
        "bare_image_tower_images_per_s": round(bare_ips),
        "bare_text_tower_texts_per_s": round(batch / text_s),
        "bare_image_share_of_bf16_peak": round(bare_ips * VIT_L14_GFLOP / (H200_BF16_PEAK_TFLOPS * 1000), 3),
        "embed_path_samples_per_s": round(n / path_s),
        "embed_path_note": "ShardEmbedder.process: tar read, PIL decode in 14 threads, resize/crop/normalise on the GPU, image and text towers, parquet write",
        "decode_cpu_preprocess_gpu_images_per_s": round(n / gpu_pre_s),
        "decode_cpu_preprocess_gpu_share_of_peak": round(
            n / gpu_pre_s * VIT_L14_GFLOP / (H200_BF16_PEAK_TFLOPS * 1000), 3
        ),
    }


def prior_check(batch: int = 512, steps: int = 20) -> dict:
    from training.conditioning import Caption, drop_caption
    from training.diffusion import noise_schedule
    from training.prior_net import DiffusionPrior, PriorConfig

    torch.manual_seed(0)
    config = PriorConfig(dim=768, width=768, depth=12, heads=12, text_token_width=768, max_text_tokens=77)
    net = DiffusionPrior(config).cuda()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=True)
    z_i = F.normalize(torch.randn(batch, 768, device="cuda"), dim=-1) * 768**0.5
    z_t = F.normalize(torch.randn(batch, 768, device="cuda"), dim=-1)
    tokens = torch.randn(batch, 77, 768, device="cuda")
    empty = Caption(torch.zeros(1, 768, device="cuda"), torch.zeros(1, 77, 768, device="cuda"))  # stands in for ""
    alphas = noise_schedule().alphas_cumprod.cuda()

    def step():
        t = torch.randint(0, 1000, (batch,), device="cuda")
        a = alphas[t][:, None]
        x_t = a.sqrt() * z_i + (1 - a).sqrt() * torch.randn_like(z_i)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            c = drop_caption(Caption(z_t, tokens), torch.rand(batch, device="cuda") < 0.1, empty)
            loss = F.mse_loss(net(x_t, t, c.z_t, c.tokens).float(), z_i)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    seconds = timed(step, steps)
    params = sum(p.numel() for p in net.parameters())
    return {
        "prior": "width 768, depth 12, heads 12, 77 text tokens, bf16 autocast, AdamW (fused)",
        "batch": batch,
        "parameters_millions": round(params / 1e6, 1),
        "train_samples_per_s": round(batch / seconds),
        "steps_per_s": round(1 / seconds, 2),
    }


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    for name, check in (("prior", prior_check), ("embed", lambda: embed_checks(Path(tempfile.mkdtemp())))):
        try:
            result[name] = check()
        except Exception as err:  # noqa: BLE001 (report and go on to the next check)
            import traceback

            result[name] = {"error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()[-2000:]}
        print(json.dumps({name: result[name]}, indent=1), flush=True)
    print(json.dumps(result, indent=1))
    (out / "gpu_checks.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
