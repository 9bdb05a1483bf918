"""`make eval`: text-to-image fidelity and diversity of unCLIP against the GLIDE-like baseline.

For two caption sets of single-object scenes (val captions, and the held-out colour+shape pairs
never seen in training) both systems draw `per_caption` images per caption at each guidance scale:
unCLIP goes text → prior → decoder(z_i) → upsampler; the baseline, the same decoder architecture
conditioned on the CLIP text embedding z_t in the same places, goes text → decoder(z_t) → upsampler.
Per (system, scale, set) it measures:

- attribute accuracy: the synthetic renderer's pixel checker (pipelines/shapes.py) names the colour,
  shape, size and position of the largest object, compared with the caption's;
- CLIP score: mean cosine between the generated image's CLIP embedding and the caption's;
- Fréchet distance between generated and real image embeddings of the same split (CLIP space);
- diversity: mean pairwise distance between the images drawn for the same caption, in pixels (RMS,
  0–1 scale) and in CLIP space (1 − cosine).

Both systems go through the same upsampler without an image embedding, so the comparison is between
the decoders; `unclip_full` is the whole unCLIP chain (its upsampler reading z_i) at the default scale.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
from scipy import linalg

from embeddings import store
from pipelines import shapes
from training.grid import save_grid

ATTRIBUTES = ("colour", "shape", "size", "position")


def eval_rows(embeddings_dir: str | Path, split: str, n: int, seed: int = 0) -> tuple[list[dict], np.ndarray]:
    """n single-object rows of `split` (a seeded choice), and every real image embedding of that split's
    single-object rows (the Fréchet reference)."""
    table = store.read_table(
        embeddings_dir, ["key", "caption", "split", "n_objects", "background", *ATTRIBUTES, "image_embedding"]
    )
    rows = [r for r in table.to_pylist() if r["split"] == split and r["n_objects"] == 1]
    if not rows:
        raise ValueError(
            f"no single-object {split} rows in {embeddings_dir}: `make eval` needs the synthetic source's attributes"
        )
    chosen = np.random.default_rng(seed).choice(len(rows), size=min(n, len(rows)), replace=False)
    real = np.stack([np.asarray(r["image_embedding"], np.float32) for r in rows])
    return [rows[i] for i in sorted(chosen)], real


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two sets of feature vectors (N, D)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root, _ = linalg.sqrtm(cov_a @ cov_b, disp=False)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * np.real(root)))


def mean_pairwise(x: np.ndarray, groups: int, metric: str) -> float:
    """Mean distance between the members of each consecutive group of x (N = groups · k), averaged."""
    values = []
    for g in np.split(x, groups):
        if metric == "rms":
            flat = g.reshape(len(g), -1)
            d = np.sqrt(((flat[:, None] - flat[None]) ** 2).mean(-1))
        else:  # 1 - cosine of unit vectors
            d = 1 - g @ g.T
        values.append(d[np.triu_indices(len(g), 1)].mean())
    return float(np.mean(values))


def score(images: np.ndarray, rows: list[dict], per_caption: int, encoder, real: np.ndarray) -> dict:
    """The metrics of images drawn per_caption at a time for `rows` (caption-major)."""
    truth = [r for r in rows for _ in range(per_caption)]
    checks = [
        shapes.attribute_accuracy(image, shapes.ShapeObject(r["shape"], r["colour"], r["size"], r["position"]))
        for image, r in zip(images, truth)
    ]
    z_img = encoder.encode_images(encoder.preprocess_on_device(list(images))).numpy()
    z_txt = encoder.encode_texts([r["caption"] for r in truth]).numpy()
    metrics = {f"{a}_accuracy": float(np.mean([c[a] for c in checks])) for a in ATTRIBUTES}
    metrics["colour_shape_accuracy"] = float(np.mean([c["colour"] and c["shape"] for c in checks]))
    metrics["clip_score"] = float((z_img * z_txt).sum(1).mean())
    metrics["frechet_clip"] = frechet_distance(z_img, real)
    metrics["diversity_pixels"] = mean_pairwise(images.astype(np.float32) / 255, len(rows), "rms")
    metrics["diversity_clip"] = mean_pairwise(z_img, len(rows), "cosine")
    metrics["images"] = len(images)
    return metrics


def diversity_at_equal_clip_score(
    results: list[dict], system: str, baseline: str, metric: str = "diversity_pixels"
) -> list[dict]:
    """For each of `system`'s points, the baseline's diversity interpolated at the same CLIP score
    (along the baseline's guidance curve), where that score lies within the baseline's range."""
    out = []
    for split in sorted({r["split"] for r in results}):
        base = sorted((r["clip_score"], r[metric]) for r in results if r["system"] == baseline and r["split"] == split)
        for r in (r for r in results if r["system"] == system and r["split"] == split):
            xs, ys = [b[0] for b in base], [b[1] for b in base]
            inside = bool(base) and xs[0] <= r["clip_score"] <= xs[-1]
            out.append(
                {
                    "split": split,
                    "guidance": r["guidance"],
                    "clip_score": r["clip_score"],
                    system: r[metric],
                    baseline: float(np.interp(r["clip_score"], xs, ys)) if inside else None,
                }
            )
    return out


def evaluate(
    data: str,
    models: str | Path = "models/synthetic",
    out_dir: str | Path = "outputs/eval",
    *,
    captions: int = 8,
    per_caption: int = 4,
    guidance_scales: tuple[float, ...] = (1.0, 1.5, 3.0),
    steps: int = 40,
    upsampler_steps: int = 8,
    baseline: str = "decoder-text",
    seed: int = 0,
    data_root: str | None = None,
) -> dict:
    """Run the comparison; writes metrics.json, table.md, guidance.png, captions.txt and sample grids to out_dir."""
    from tqdm import tqdm

    from pipelines.data_config import load_data_config
    from training.export import load_decoder
    from training.generate import UnCLIP

    layout = load_data_config(data, [f"data_root={data_root}"] if data_root else None).layout
    out_dir = Path(out_dir)
    full = UnCLIP.load(models)
    # The comparison isolates the decoders: both go through the upsampler without an embedding
    # (the baseline has no image embedding to give it). The whole unCLIP chain is measured beside it.
    systems = {"unclip": UnCLIP(full.encoder, full.decoder, full.prior, full.upsampler, upsampler_embedding=False)}
    if (Path(models) / baseline / "config.json").is_file():
        systems["glide_like"] = UnCLIP(
            full.encoder,
            load_decoder(Path(models) / baseline, full.encoder.checksum, full.encoder),
            None,
            full.upsampler,
        )
    else:
        print(
            f"no baseline decoder in {Path(models) / baseline}: run `make train-decoder DECODER_CONFIG=configs/decoder/text-small.yaml`"
        )
    sets = {split: eval_rows(layout.embeddings, split, captions, seed) for split in ("val", "heldout")}
    default_scale = float(full.decoder.sampling.guidance_scale)
    scales = sorted(set(map(float, guidance_scales)) | {default_scale})
    results = []
    jobs = [(s, g, split) for s in systems for g in scales for split in sets]
    if full.upsampler is not None and full.upsampler.config.dim:
        systems["unclip_full"] = full
        jobs += [("unclip_full", default_scale, split) for split in sets]
    for system, scale, split in tqdm(jobs, desc="eval", unit="cell"):
        rows, real = sets[split]
        prompts = [r["caption"] for r in rows]
        images = systems[system].text_to_image(
            prompts, per_caption, seed, guidance_scale=scale, steps=steps, upsampler_steps=upsampler_steps
        )
        results.append(
            {
                "system": system,
                "guidance": scale,
                "split": split,
                **score(images, rows, per_caption, full.encoder, real),
            }
        )
        if scale == default_scale:
            save_grid(images, out_dir / f"samples-{split}-{system}.png", columns=per_caption * 4)
    summary = {
        "data": data,
        "models": str(models),
        "captions_per_set": captions,
        "per_caption": per_caption,
        "decoder_steps": steps,
        "upsampler_steps": upsampler_steps,
        "default_guidance": default_scale,
        "results": results,
    }
    if "glide_like" in systems:
        summary["diversity_at_equal_clip_score"] = {
            name: diversity_at_equal_clip_score(results, "unclip", "glide_like", f"diversity_{name}")
            for name in ("pixels", "clip")
        }
    out_dir.mkdir(parents=True, exist_ok=True)
    store.write_json(out_dir / "metrics.json", summary)
    (out_dir / "table.md").write_text(markdown_table(results) + "\n")
    plot_guidance(results, out_dir / "guidance.png")
    captions_file = out_dir / "captions.txt"
    captions_file.write_text("".join(f"{split}: {r['caption']}\n" for split, (rows, _) in sets.items() for r in rows))
    return summary


def markdown_table(results: list[dict]) -> str:
    """One row per (set, system, guidance scale)."""
    columns = (
        "colour_accuracy",
        "shape_accuracy",
        "position_accuracy",
        "clip_score",
        "frechet_clip",
        "diversity_pixels",
        "diversity_clip",
    )
    lines = [
        "| set | system | guidance | colour | shape | position | CLIP score | Fréchet (CLIP) | diversity (px) | diversity (CLIP) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(results, key=lambda r: (r["split"], r["system"], r["guidance"])):
        values = [f"{r[c]:.1%}" if c.endswith("accuracy") else f"{r[c]:.3f}" for c in columns]
        lines.append(f"| {r['split']} | {r['system']} | {r['guidance']:g} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def plot_guidance(results: list[dict], path: Path) -> None:
    """Accuracy, CLIP score and diversity against guidance, and diversity against CLIP score."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("colour_accuracy", "colour accuracy"),
        ("shape_accuracy", "shape accuracy"),
        ("clip_score", "CLIP score"),
        ("diversity_pixels", "diversity (pixel RMS)"),
    ]
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(4 * (len(panels) + 1), 3.4))
    combos = sorted({(r["system"], r["split"]) for r in results})
    for (system, split), style in zip(combos, itertools.cycle(("-o", "--o", "-s", "--s", "-^", "--^"))):
        points = sorted(
            (r for r in results if r["system"] == system and r["split"] == split), key=lambda r: r["guidance"]
        )
        for ax, (metric, label) in zip(axes, panels):
            ax.plot([p["guidance"] for p in points], [p[metric] for p in points], style, label=f"{system} ({split})")
            ax.set_xlabel("guidance scale")
            ax.set_title(label)
        axes[-1].plot(
            [p["clip_score"] for p in points],
            [p["diversity_pixels"] for p in points],
            style,
            label=f"{system} ({split})",
        )
    axes[-1].set_xlabel("CLIP score (fidelity)")
    axes[-1].set_title("diversity against fidelity")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_losses(run_dirs: dict[str, Path], path: Path) -> Path | None:
    """Training loss (and val loss where logged) of each run's CSV log, one panel per run."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logs = {
        name: Path(d) / "logs" / "metrics.csv"
        for name, d in run_dirs.items()
        if (Path(d) / "logs" / "metrics.csv").is_file()
    }
    if not logs:
        return None
    fig, axes = plt.subplots(1, len(logs), figsize=(4 * len(logs), 3.2), squeeze=False)
    for ax, (name, log) in zip(axes[0], logs.items()):
        with log.open() as f:
            rows = list(csv.DictReader(f))
        for metric in ("train/loss", "val/loss"):
            points = [(int(r["step"]), float(r[metric])) for r in rows if r.get(metric)]
            if points:
                ax.plot(*zip(*points), label=metric)
        ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main_summary(summary: dict) -> str:
    """The headline lines printed at the end of `make eval`."""
    default = summary["default_guidance"]
    lines = []
    for r in summary["results"]:
        if r["guidance"] == default:
            lines.append(
                f"{r['split']:>8} {r['system']:<11} colour {r['colour_accuracy']:.1%}  shape {r['shape_accuracy']:.1%}  "
                f"position {r['position_accuracy']:.1%}  CLIP score {r['clip_score']:.3f}  "
                f"diversity {r['diversity_pixels']:.3f}"
            )
    for name, points in summary.get("diversity_at_equal_clip_score", {}).items():
        for p in points:
            if p["glide_like"] is not None:
                lines.append(
                    f"{p['split']:>8} guidance {p['guidance']:g}: diversity ({name}) at CLIP score {p['clip_score']:.3f}: "
                    f"unclip {p['unclip']:.3f}, glide_like {p['glide_like']:.3f}"
                )
    return "\n".join(lines)
