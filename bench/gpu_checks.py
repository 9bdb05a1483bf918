"""The GPU timings the issues ask for, in one short script for a lent GPU machine (no Ray there).

    python bench/gpu_checks.py OUT_DIR            # on the GPU, full size
    python bench/gpu_checks.py OUT_DIR --smoke    # every check at toy size on the CPU (what make test runs)

1. embed path: ViT-L-14 (random weights, bf16) fed by the embed job's own path
   (`pipelines.embed.ShardEmbedder.process` on a webdataset tar of 256 px JPEGs) with JPEGs decoded on the GPU
   (torchvision, the job's default there) and with PIL on 14 CPU threads, against the same encoder's bare
   forward pass on pre-made tensors; images/s and the share of the GPU's bf16 peak (ViT-L-14 at 224 px ≈ 162
   GFLOP per image, counting a multiply-add as 2).
2. training: the full-size prior, decoder and upsampler (their configs' sizes and per-GPU batches), a few
   bf16-autocast AdamW steps each, with and without gradient checkpointing: step time, samples/s, peak memory
   beside the job's own estimate (training/memory.py), and model FLOP utilisation (the estimate's FLOPs per
   sample × samples/s over the 989 TFLOP/s dense bf16 data-sheet peak).
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

# ViT-L-14 at 224 px, forward: 2 FLOPs × ~303 M weights × 257 tokens ≈ 156 GFLOP, plus attention ≈ 162.
VIT_L14_GFLOP = 162.0
# Dense bf16, the H100/H200 SXM data sheet; issue 19 reports ~790 on a large matmul. MFU is against this figure
# whatever GPU runs the script (the report names the device).
H200_BF16_PEAK_TFLOPS = 989.0


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


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def make_odd_tar(path: Path, size: int = 256) -> None:
    """A tar of the JPEGs a web crawl holds beside plain ones: greyscale, CMYK, progressive, and one cut short."""

    from pipelines import shapes

    scene = shapes.render(shapes.sample_scene(np.random.default_rng(1)), size)
    variants = {}
    for name, image, options in (
        ("grey", scene.convert("L"), {}),
        ("cmyk", scene.convert("CMYK"), {}),
        ("progressive", scene, {"progressive": True}),
        ("plain", scene, {}),
    ):
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", **options)
        variants[name] = buffer.getvalue()
    variants["truncated"] = variants["plain"][: len(variants["plain"]) // 2]
    with tarfile.open(path, "w") as tar:
        for i, (name, data) in enumerate(variants.items()):
            for ext, payload in (("jpg", data), ("txt", name.encode())):
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def odd_jpegs(embedder, work: Path) -> dict:
    """The odd JPEGs through both decoders of one embedder (one set of random weights): what each embedded,
    handed to PIL or skipped, and the lowest cosine between the two decoders' embeddings of the same image."""
    import pyarrow.parquet as pq

    (work / "odd").mkdir()
    make_odd_tar(work / "odd" / "00000.tar")
    records, vectors = {}, {}
    for decoder in ("torchvision", "pil"):
        embedder.decode_on_device, embedder.output_dir = decoder == "torchvision", work / f"odd-{decoder}"
        records[decoder] = embedder.process(str(work / "odd" / "00000.tar"))
        table = pq.read_table(work / f"odd-{decoder}" / "00000.parquet")
        vectors[decoder] = dict(zip(table.column("caption").to_pylist(), table.column("image_embedding").to_pylist()))
    common = sorted(set(vectors["torchvision"]) & set(vectors["pil"]))
    pairs = [(np.asarray(vectors["torchvision"][c], float), np.asarray(vectors["pil"][c], float)) for c in common]
    cosines = [float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))) for a, b in pairs]
    return {
        "embedded_by": {d: sorted(v) for d, v in vectors.items()},
        "decoded_by_pil": records["torchvision"].get("decoded_by_pil"),
        "skipped": {d: r["skipped"] for d, r in records.items()},
        "min_cosine_torchvision_vs_pil": round(min(cosines), 4) if cosines else None,
    }


def timed(fn, repeats: int = 1) -> float:
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - start) / repeats


def embed_checks(work: Path, smoke: bool = False) -> dict:
    """The embed job's path (GPU decoding, then PIL decoding) against the bare image and text towers."""
    from pipelines.embed import ShardEmbedder

    n, batch, device = (16, 8, "cpu") if smoke else (4096, 256, "cuda")
    model = {"model": "RN50", "precision": "fp32"} if smoke else {"model": "ViT-L-14", "precision": "bf16"}
    make_tar(work / "00000.tar", n)
    result = {"model": f"{model['model']} (random weights), {model['precision']}, batch {batch}"}
    embedders = {}
    for decoder in ("torchvision", "pil"):
        embedder = embedders[decoder] = ShardEmbedder(
            dict(model, device=device), str(work / decoder), batch_size=batch, decode_threads=14, decoder=decoder
        )
        embedder.process(str(work / "00000.tar"))  # warm-up of the whole path
        seconds = timed(lambda: embedder.process(str(work / "00000.tar")))
        result[f"embed_path_{decoder}_decode_samples_per_s"] = round(n / seconds, 1)
    result["odd_jpegs"] = odd_jpegs(embedders["torchvision"], work)
    encoder = embedder.encoder
    size = encoder.image_size if isinstance(encoder.image_size, int) else encoder.image_size[0]
    pixels = torch.randn(batch, 3, size, size, device=device, dtype=encoder.dtype)
    texts = ["a small red circle at the top left on a gray background"] * batch
    encoder.encode_images(pixels), encoder.encode_texts(texts)  # warm-up
    image_s = timed(lambda: encoder.encode_images(pixels), 3 if smoke else 10)
    text_s = timed(lambda: encoder.encode_texts(texts), 3 if smoke else 10)
    towers = batch / (image_s + text_s)  # samples/s of both towers back to back, nothing else
    result.update(
        bare_image_tower_images_per_s=round(batch / image_s, 1),
        bare_text_tower_texts_per_s=round(batch / text_s, 1),
        bare_towers_samples_per_s=round(towers, 1),
        bare_image_share_of_bf16_peak=None  # ViT-L-14's FLOPs over the H200's peak: not the smoke run's
        if smoke
        else round(batch / image_s * VIT_L14_GFLOP / (H200_BF16_PEAK_TFLOPS * 1000), 3),
        job_over_towers=round(result["embed_path_torchvision_decode_samples_per_s"] / towers, 3),
    )
    return result


def networks(smoke: bool) -> dict:
    """{name: (build, per-GPU batch, inputs(net, batch))} of the full-size configs (toy sizes with `smoke`)."""
    import yaml

    from training.decoder_job import DECODER_JOB
    from training.decoder_net import DecoderConfig, Upsampler, UpsamplerConfig, build_decoder
    from training.prior_net import DiffusionPrior, PriorConfig

    root = Path(__file__).resolve().parents[1] / "configs"
    read = lambda path: yaml.safe_load((root / path).read_text())  # noqa: E731
    prior, decoder, upsampler = (
        read("prior/laion-vit-l14.yaml"),
        read("decoder/laion-64px.yaml"),
        read("decoder/upsampler-laion-256.yaml"),
    )
    if smoke:  # the configs' own settings (raw CLIP space, Karlo's layout) at toy sizes
        toy = {"dim": 32, "text_token_width": 32}
        prior = dict(
            prior, prior=dict(prior["prior"], **toy, width=32, depth=1, heads=2, max_text_tokens=8), batch_size=2
        )
        decoder = dict(
            decoder,
            decoder=dict(
                decoder["decoder"],
                **toy,
                channels=[32, 32],
                layers_per_block=1,
                head_width=16,
                context_width=32,
                norm_groups=8,
                image_size=8,
            ),
            batch_size=2,
        )
        upsampler = dict(
            upsampler,
            upsampler=dict(upsampler["upsampler"], image_size=16, channels=[16, 16], layers_per_block=1, norm_groups=8),
            train_crop=8,
            batch_size=2,
        )
    crop = upsampler.get("train_crop", 0)
    return {
        "prior": (
            lambda: DiffusionPrior(PriorConfig(**prior["prior"])),
            prior["batch_size"],
            lambda n, b: n.example_inputs(b),
        ),
        "decoder": (
            lambda: build_decoder(DecoderConfig(**decoder["decoder"])),
            decoder.get("batch_size", DECODER_JOB.defaults["batch_size"]),
            lambda n, b: n.example_inputs(b),
        ),
        "upsampler": (
            lambda: Upsampler(UpsamplerConfig(**upsampler["upsampler"])),
            upsampler["batch_size"],
            lambda n, b: n.example_inputs(b, crop),
        ),
    }


def train_check(build, batch: int, inputs, checkpointing: bool, steps: int, device: str) -> dict:
    """A few bf16-autocast AdamW steps of one network: step time, samples/s, peak memory against the job's
    estimate, and model FLOP utilisation."""
    from training.memory import checkpoint_activations, estimate

    figures = estimate(build, batch, "bf16-mixed", checkpointing, inputs, device_type=device)
    torch.manual_seed(0)
    net = build().to(device)
    if checkpointing:
        checkpoint_activations(net)
    ema = [p.detach().clone() for p in net.parameters()]  # the job's EMA copy, as memory
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=device == "cuda")
    args = inputs(net, batch)

    def step():
        with torch.autocast(device, dtype=torch.bfloat16):
            out = net(*args)
        out.float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = timed(step, steps)
    samples = batch / seconds
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    del ema
    return {
        "batch": batch,
        "gradient_checkpointing": checkpointing,
        "parameters_millions": round(figures["parameters"] / 1e6, 1),
        "step_s": round(seconds, 4),
        "samples_per_s": round(samples, 1),
        "peak_memory_gb": None if peak is None else round(peak, 2),
        "estimated_memory_gb": figures["memory_gb"]["total"],
        "flops_per_sample": figures["flops_per_sample"],
        "model_flop_utilisation": float(
            f"{samples * figures['flops_per_sample'] / (H200_BF16_PEAK_TFLOPS * 1e12):.3g}"
        ),
    }


def main() -> None:
    out = Path(sys.argv[1])
    smoke = "--smoke" in sys.argv[2:]
    out.mkdir(parents=True, exist_ok=True)
    device = "cpu" if smoke else "cuda"
    result = {"device": "cpu (smoke)" if smoke else torch.cuda.get_device_name(), "torch": torch.__version__}
    checks = {"embed": lambda: embed_checks(Path(tempfile.mkdtemp()), smoke)}
    for name, (build, batch, inputs) in networks(smoke).items():
        for checkpointing in (False, True):
            label = f"{name}{'_checkpointed' if checkpointing else ''}"
            checks[label] = lambda b=build, n=batch, i=inputs, c=checkpointing: train_check(
                b, n, i, c, 1 if smoke else 10, device
            )
    for name, check in checks.items():
        try:
            result[name] = check()
        except Exception as err:  # noqa: BLE001 (report and go on to the next check)
            import traceback

            result[name] = {"error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()[-2000:]}
        if device == "cuda":
            torch.cuda.empty_cache()
        print(json.dumps({name: result[name]}, indent=1), flush=True)
    (out / "gpu_checks.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
