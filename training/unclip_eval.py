"""`make eval`: text-to-image fidelity and diversity of unCLIP against the GLIDE-like baseline.

For two caption sets of single-object scenes (val captions, and the held-out colour+shape pairs
never seen in training) both systems draw `per_caption` images per caption at each guidance scale:
unCLIP goes text → prior → decoder(z_i) → upsampler; the baseline, the same decoder architecture
conditioned on the CLIP text embedding z_t in the same places, goes text → decoder(z_t) → upsampler.
Per (system, scale, set) it measures:

- fidelity and open diversity (training/open_eval.py): the share of the attributes a caption names
  that the pixel checker reads back, and how the images drawn for it spread over the attributes it
  leaves open (background, position, size; normalised entropy), with bootstrap 95% intervals over
  captions, and unCLIP − baseline over the same captions with paired intervals;
- attribute accuracy: colour, shape, size and position of the largest object, over the captions that
  name the attribute;
- CLIP score: mean cosine between the generated image's CLIP embedding and the caption's;
- Fréchet distance between generated and real image embeddings of the same split (CLIP space);
- diversity: mean pairwise distance between the images drawn for the same caption, in pixels (RMS,
  0–1 scale) and in CLIP space (1 − cosine).

The prior is also judged alone, decoding nothing: its samples for val captions against the true image
embedding, the text embedding and an unrelated image (cosines), and classified by their nearest
training image for fidelity and open diversity.

Both systems go through the same upsampler without an image embedding, so the comparison is between
the decoders; `unclip_full` is the whole unCLIP chain (its upsampler reading z_i) at the default scale.
`decoder_true_z` judges the decoder alone, as the prior was: unCLIP's decoder given each caption's own
image's z_i in place of the prior's sample, at the default scale, through the same upsampler without an
embedding as the `unclip` rows (and the same seeds), so a loss in `unclip` shows whether it is the prior's
or the decoder's (its open diversity is the decoder's own spread around one z_i).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
from scipy import linalg

from embeddings import store
from pipelines import shapes
from training import open_eval
from training.grid import save_grid

ATTRIBUTES = ("colour", "shape", "size", "position")
DECODER_ALONE = "decoder_true_z"  # the system name of the decoder given the true image embeddings


def eval_rows(table: list[dict], split: str, n: int, seed: int = 0) -> tuple[list[dict], np.ndarray]:
    """n rows of `split` from single_object_rows (a seeded choice), and every real image embedding of that
    split (the Fréchet reference)."""
    rows = [r for r in table if r["split"] == split]
    if not rows:
        raise ValueError(f"no single-object {split} rows: `make eval` needs the synthetic source's attributes")
    chosen = np.random.default_rng(seed).choice(len(rows), size=min(n, len(rows)), replace=False)
    real = np.stack([np.asarray(r["image_embedding"], np.float32) for r in rows])
    return [rows[i] for i in sorted(chosen)], real


def single_object_rows(embeddings_dir: str | Path) -> list[dict]:
    """Every single-object row of the data set: key, caption, split, attributes, what the caption names, z_i (and
    its raw norm where the shards carry it)."""
    columns = ["key", "caption", "split", "n_objects", "background", *ATTRIBUTES, "image_embedding"]
    paths = store.shard_paths(embeddings_dir)
    names = store.shard_file(paths[0]).schema_arrow.names if paths else []
    optional = [c for c in (shapes.NAMED_COLUMN, store.NORM_COLUMNS["image_embedding"]) if c in names]
    table = store.read_table(embeddings_dir, columns + optional)
    return [r for r in table.to_pylist() if r["n_objects"] == 1]


def true_embeddings(rows: list[dict], per_caption: int, raw: bool) -> torch.Tensor:
    """Each row's own CLIP image embedding z_i, `per_caption` times (row-major): unit, or raw (unit × image_norm)
    for a decoder in Karlo's layout. What the decoder is given when it is judged alone, without the prior."""
    import torch

    norm = store.NORM_COLUMNS["image_embedding"]
    if raw:
        store.require_norms(list(rows[0]), "the eval rows", ("image_embedding",))
    z = [np.asarray(r["image_embedding"], np.float32) * (r[norm] if raw else 1.0) for r in rows]
    return torch.from_numpy(np.repeat(np.stack(z), per_caption, axis=0))


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


def score(
    images: np.ndarray, rows: list[dict], per_caption: int, encoder, real: np.ndarray, reference: dict[str, float]
) -> dict:
    """The metrics of images drawn per_caption at a time for `rows` (caption-major). Attribute accuracies
    count the captions that name the attribute; fidelity and open diversity are open_eval's."""
    readings = [open_eval.read_image(image) for image in images]
    per_caption_scores = [
        open_eval.caption_scores(readings[i * per_caption : (i + 1) * per_caption], row, reference)
        for i, row in enumerate(rows)
    ]
    summary = open_eval.summarise(per_caption_scores)
    metrics = {f"{a}_accuracy": summary.pop(f"named_{a}_accuracy") for a in open_eval.CHECKED}
    truth = [r for r in rows for _ in range(per_caption)]
    z_img = encoder.encode_images(encoder.preprocess_on_device(list(images))).numpy()
    z_txt = encoder.encode_texts([r["caption"] for r in truth]).numpy()
    both = [  # colour and shape right together, on the images of captions that name both
        reading["colour"] == r["colour"] and reading["shape"] == r["shape"]
        for reading, r in zip(readings, truth)
        if {"colour", "shape"} <= open_eval.named_of(r)
    ]
    metrics["colour_shape_accuracy"] = float(np.mean(both)) if both else None
    metrics.update(summary)
    cosines = (z_img * z_txt).sum(1)
    metrics["clip_score"] = float(cosines.mean())
    metrics["clip_score_per_caption"] = [float(c) for c in cosines.reshape(len(rows), per_caption).mean(1)]
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
    guidance_scales: tuple[float, ...] = (1.0, 2.0, 4.0),
    steps: int = 40,
    upsampler_steps: int = 8,
    baseline: str = "decoder-text",
    prior_captions: int = 64,
    prior_samples: int = 8,
    seed: int = 0,
    data_root: str | None = None,
) -> dict:
    """Run the comparison; writes metrics.json, table.md, guidance.png, diversity_fidelity.png, captions.txt and
    sample grids to out_dir. `prior_captions` val captions × `prior_samples` prior samples judge the prior alone."""
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
    table = single_object_rows(layout.embeddings)
    sets = {split: eval_rows(table, split, captions, seed) for split in ("val", "heldout")}
    train = [r for r in table if r["split"] == "train"]
    reference = open_eval.reference_entropy(train)
    default_scale = float(full.decoder.sampling.guidance_scale)
    scales = sorted(set(map(float, guidance_scales)) | {default_scale})
    results = []
    jobs = [(s, g, split) for s in systems for g in scales for split in sets]
    if full.upsampler is not None and full.upsampler.config.dim:
        systems["unclip_full"] = full
        jobs += [("unclip_full", default_scale, split) for split in sets]
    jobs += [(DECODER_ALONE, default_scale, split) for split in sets]
    # Read before any cell is drawn, so that embeddings without the norms a raw decoder needs fail first.
    true_z = {split: true_embeddings(rows, per_caption, systems["unclip"].raw) for split, (rows, _) in sets.items()}
    for system, scale, split in tqdm(jobs, desc="eval", unit="cell"):
        rows, real = sets[split]
        prompts = [r["caption"] for r in rows]
        alone = system == DECODER_ALONE  # the unclip rows' system, given each caption's own image's z_i
        images = systems["unclip" if alone else system].text_to_image(
            prompts,
            per_caption,
            seed,
            z=true_z[split] if alone else None,
            guidance_scale=scale,
            steps=steps,
            upsampler_steps=upsampler_steps,
        )
        results.append(
            {
                "system": system,
                "guidance": scale,
                "split": split,
                **score(images, rows, per_caption, full.encoder, real, reference),
            }
        )
        if scale == default_scale:
            save_grid(images, out_dir / f"samples-{split}-{system}.png", columns=per_caption * 4)
    summary = {
        "open_diversity_of_data_draws": {
            "per_caption": open_eval.data_draws(train, per_caption),
            "prior_samples": open_eval.data_draws(train, prior_samples),
        },
        "data": data,
        "models": str(models),
        "captions_per_set": captions,
        "seed": seed,
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
        summary["unclip_minus_glide_like"] = differences(results, "unclip", "glide_like")
    if full.prior is not None:
        summary["prior"] = evaluate_prior_spread(full, table, prior_captions, prior_samples, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    store.write_json(out_dir / "metrics.json", summary)
    tables = [markdown_table(results)]
    if "unclip_minus_glide_like" in summary:
        tables.append(differences_table(summary["unclip_minus_glide_like"]))
    draws = summary["open_diversity_of_data_draws"]["per_caption"]
    tables.append(
        f"Open diversity of {per_caption} training rows drawn at random (the reference for {per_caption} "
        "images per caption): " + ", ".join(f"{a} {v:.2f}" for a, v in draws.items()) + "."
    )
    if "prior" in summary:
        tables.append(prior_table(summary["prior"], summary["open_diversity_of_data_draws"]["prior_samples"]))
    (out_dir / "table.md").write_text("\n\n".join(tables) + "\n")
    plot_guidance(results, out_dir / "guidance.png")
    plot_diversity_fidelity(results, out_dir / "diversity_fidelity.png")
    captions_file = out_dir / "captions.txt"
    captions_file.write_text("".join(f"{split}: {r['caption']}\n" for split, (rows, _) in sets.items() for r in rows))
    return summary


def differences(results: list[dict], system: str, baseline: str) -> list[dict]:
    """Per (set, guidance): `system` − `baseline` in open diversity and fidelity over the same captions,
    with paired bootstrap 95% intervals."""
    out = []
    for r in results:
        if r["system"] != system:
            continue
        base = next(
            (
                b
                for b in results
                if b["system"] == baseline and (b["split"], b["guidance"]) == (r["split"], r["guidance"])
            ),
            None,
        )
        if base is None:
            continue
        row = {"split": r["split"], "guidance": r["guidance"]}
        for metric in ("open_diversity", "fidelity"):
            row[metric] = open_eval.paired_difference(r[f"{metric}_per_caption"], base[f"{metric}_per_caption"])
        out.append(row)
    return out


def evaluate_prior_spread(unclip, table: list[dict], captions: int, samples: int, seed: int) -> dict:
    """The prior alone on val captions (open_eval.prior_spread), next to the text embedding z_t judged the same
    way (one point per caption: no spread), and the LAION-style cosines of the prior's samples."""
    rows, _ = eval_rows(table, "val", captions, seed + 1)
    train = [r for r in table if r["split"] == "train"]
    train_z = np.stack([np.asarray(r["image_embedding"], np.float32) for r in train])
    prompts = [r["caption"] for r in rows for _ in range(samples)]
    seeds = [seed + i for i in range(len(prompts))]
    z = unclip.prior_embeddings(prompts, seeds).float().numpy()
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    z_t = unclip.embed_texts([r["caption"] for r in rows]).float().numpy()
    z_t = z_t / np.linalg.norm(z_t, axis=1, keepdims=True)
    z_i = np.stack([np.asarray(r["image_embedding"], np.float32) for r in rows])
    own = np.repeat(z_i, samples, axis=0)
    return {
        "captions": len(rows),
        "samples_per_caption": samples,
        "cosine_predicted": float((z * own).sum(1).mean()),
        "cosine_text": float((z_t * z_i).sum(1).mean()),
        # another caption's image (none with a single caption)
        "cosine_unrelated": float((z * np.roll(own, samples, axis=0)).sum(1).mean()) if len(rows) > 1 else None,
        "prior": open_eval.prior_spread(z, rows, train_z, train, samples),
        "text_embedding": open_eval.prior_spread(np.repeat(z_t, samples, axis=0), rows, train_z, train, samples),
    }


def _with_interval(value, interval, spec: str = ".2f") -> str:
    """`value` and its interval (if any) formatted with `spec`; '–' for no value."""
    if value is None:
        return "–"
    return format(value, spec) + (f" [{interval[0]:{spec}}, {interval[1]:{spec}}]" if interval else "")


def differences_table(rows: list[dict]) -> str:
    """unCLIP − baseline per set and guidance, with 95% intervals."""
    lines = [
        "| set | guidance | Δ open diversity [95%] | Δ fidelity [95%] | captions (open / all) |",
        "|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["split"], r["guidance"])):
        cells = [_with_interval(d["mean"], d["interval"]) if d else "–" for d in (r["open_diversity"], r["fidelity"])]
        n = [(d or {}).get("captions", 0) for d in (r["open_diversity"], r["fidelity"])]
        lines.append(f"| {r['split']} | {r['guidance']:g} | {cells[0]} | {cells[1]} | {n[0]} / {n[1]} |")
    return "\n".join(lines)


def prior_table(prior: dict, draws: dict[str, float]) -> str:
    """The prior's samples against the text embedding: cosines to the true image, fidelity and open diversity."""
    lines = [
        f"Prior on {prior['captions']} val captions, {prior['samples_per_caption']} samples each, judged by the "
        "nearest training image: cosine to the true image embedding "
        f"{prior['cosine_predicted']:.3f} (text embedding {prior['cosine_text']:.3f}, an unrelated image "
        f"{_with_interval(prior['cosine_unrelated'], None)}).",
        "",
        "| embedding | fidelity [95%] | open diversity [95%] |",
        "|---|---|---|",
    ]
    for name in ("prior", "text_embedding"):
        p = prior[name]
        lines.append(
            f"| {name} | {_with_interval(p['fidelity'], p['fidelity_interval'])} | "
            f"{_with_interval(p['open_diversity'], p['open_diversity_interval'])} |"
        )
    lines.append(
        f"\n{prior['samples_per_caption']} training rows drawn at random would score open diversity "
        + ", ".join(f"{a} {v:.2f}" for a, v in draws.items())
        + "."
    )
    return "\n".join(lines)


COMPARED = {"fidelity": "fidelity", "open_diversity": "open diversity", "clip_score": "CLIP score"}  # per caption
SAME_SETTINGS = ("captions_per_set", "per_caption", "decoder_steps", "upsampler_steps", "seed")
SAME_PRIOR_SETTINGS = ("captions", "samples_per_caption")


def _read_eval(folder: Path, system: str) -> tuple[dict, str]:
    """metrics.json and captions.txt of a `make eval` folder, refused when it predates what `compare` reads."""
    if not (folder / "metrics.json").is_file():
        raise FileNotFoundError(f"no metrics.json in {folder}: run `make eval OUT={folder}` first")
    summary = json.loads((folder / "metrics.json").read_text())
    cells = [r for r in summary["results"] if r["system"] == system]
    if "seed" not in summary or any(f"{m}_per_caption" not in r for r in cells for m in COMPARED):
        raise ValueError(
            f"{folder} was written by an older `make eval` (no seed or per-caption CLIP scores): run it again on "
            "this code"
        )
    return summary, (folder / "captions.txt").read_text()


def compare(before: str | Path, after: str | Path, system: str = "unclip") -> dict:
    """`system`'s cells in two `make eval` folders drawn alike (same captions, images per caption, steps, seed,
    guidance scales and prior samples: the models before and after a change): per (set, guidance) both means and
    after − before over the same captions, with paired bootstrap 95% intervals; the prior alone beside them.
    Folders drawn differently are refused, naming what differs."""
    (a, captions_a), (b, captions_b) = (_read_eval(Path(f), system) for f in (before, after))
    differing = [k for k in SAME_SETTINGS if a[k] != b[k]]
    differing += ["captions.txt"] if captions_a != captions_b else []
    cells_a, cells_b = (
        {(r["split"], r["guidance"]): r for r in run["results"] if r["system"] == system} for run in (a, b)
    )
    for folder, found in ((before, cells_a), (after, cells_b)):
        if not found:
            raise ValueError(f"no cell of system {system!r} in {folder}")
    differing += ["guidance scales"] if set(cells_a) != set(cells_b) else []
    prior_a, prior_b = a.get("prior"), b.get("prior")
    if (prior_a is None) != (prior_b is None) or (
        prior_a and any(prior_a[k] != prior_b[k] for k in SAME_PRIOR_SETTINGS)
    ):
        differing.append("prior samples")
    if differing:
        raise ValueError(
            f"{before} and {after} were not drawn alike ({', '.join(differing)} differ): run both `make eval`s "
            "with the same EVAL_OPTS on the same data set"
        )
    cells = []
    for key in sorted(cells_b):
        old, new = cells_a[key], cells_b[key]
        cell = {"split": key[0], "guidance": key[1]}
        for metric in COMPARED:
            cell[metric] = {
                "before": old[metric],
                "after": new[metric],
                "difference": open_eval.paired_difference(new[f"{metric}_per_caption"], old[f"{metric}_per_caption"]),
            }
        cells.append(cell)
    prior = {"before": prior_a, "after": prior_b} if prior_b else {}
    return {"system": system, "before": str(before), "after": str(after), "cells": cells, "prior": prior}


def comparison_table(comparison: dict) -> str:
    """`compare`'s figures as markdown: per cell before → after and the paired difference with its 95% interval;
    a last row with the means over the cells (of the figures, and of the cells' paired differences); the prior
    alone. A figure a cell does not define (open diversity where no caption leaves anything open) is '–'."""
    header = " | ".join(f"{label} before → after | Δ [95%]" for label in COMPARED.values())
    lines = [f"| set | guidance | {header} |", "|---|---|" + "---|---|" * len(COMPARED)]
    for c in comparison["cells"]:
        parts = []
        for m in COMPARED:
            d = c[m]["difference"] or {"mean": None, "interval": None}
            before, after = (_with_interval(c[m][k], None, ".3f") for k in ("before", "after"))
            parts.append(f"{before} → {after} | {_with_interval(d['mean'], d['interval'], '.3f')}")
        lines.append(f"| {c['split']} | {c['guidance']:g} | " + " | ".join(parts) + " |")

    def mean(values: list) -> float | None:
        defined = [v for v in values if v is not None]
        return float(np.mean(defined)) if defined else None

    means = []
    for m in COMPARED:
        cells = comparison["cells"]
        differences = [c[m]["difference"]["mean"] if c[m]["difference"] else None for c in cells]
        means.append(
            f"{_with_interval(mean([c[m]['before'] for c in cells]), None, '.3f')} → "
            f"{_with_interval(mean([c[m]['after'] for c in cells]), None, '.3f')} | "
            f"{_with_interval(mean(differences), None, '+.3f')}"
        )
    lines.append("| mean of the cells | | " + " | ".join(means) + " |")
    if comparison["prior"]:
        p, q = comparison["prior"]["before"], comparison["prior"]["after"]
        lines.append(
            f"\nPrior alone ({q['captions']} val captions × {q['samples_per_caption']}): open diversity "
            f"{_with_interval(p['prior']['open_diversity'], p['prior'].get('open_diversity_interval'))} → "
            f"{_with_interval(q['prior']['open_diversity'], q['prior'].get('open_diversity_interval'))}, fidelity "
            f"{_with_interval(p['prior']['fidelity'], None)} → {_with_interval(q['prior']['fidelity'], None)}, cosine to the "
            f"true image {p['cosine_predicted']:.3f} → {q['cosine_predicted']:.3f}."
        )
    return "\n".join(lines)


def markdown_table(results: list[dict]) -> str:
    """One row per (set, system, guidance scale); accuracies count the captions that name the attribute."""
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
        "| set | system | guidance | fidelity [95%] | open diversity [95%] | colour | shape | position | CLIP score "
        "| Fréchet (CLIP) | diversity (px) | diversity (CLIP) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(results, key=lambda r: (r["split"], r["system"], r["guidance"])):
        values = [
            _with_interval(r["fidelity"], r["fidelity_interval"]),
            _with_interval(r["open_diversity"], r["open_diversity_interval"]),
        ]
        for c in columns:
            v = r[c]
            values.append("–" if v is None else f"{v:.1%}" if c.endswith("accuracy") else f"{v:.3f}")
        lines.append(f"| {r['split']} | {r['system']} | {r['guidance']:g} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def plot_diversity_fidelity(results: list[dict], path: Path) -> None:
    """Open-attribute diversity against fidelity, one curve per (system, set) along the guidance scales, with
    the bootstrap intervals as error bars: the paper's diversity–fidelity comparison in miniature."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), squeeze=False)
    for ax, split in zip(axes[0], ("val", "heldout")):
        for system, marker in (("unclip", "o"), ("glide_like", "s")):
            points = sorted(
                (
                    r
                    for r in results
                    if (r["system"], r["split"]) == (system, split) and r["open_diversity"] is not None
                ),
                key=lambda r: r["guidance"],
            )
            if not points:
                continue
            x = [p["fidelity"] for p in points]
            y = [p["open_diversity"] for p in points]
            xerr = np.abs(np.asarray([p["fidelity_interval"] for p in points]).T - x)
            yerr = np.abs(np.asarray([p["open_diversity_interval"] for p in points]).T - y)
            ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt=f"-{marker}", capsize=3, label=system)
            for p in points:
                ax.annotate(f"g={p['guidance']:g}", (p["fidelity"], p["open_diversity"]), fontsize=7)
        ax.set_xlabel("fidelity (named attributes read back)")
        ax.set_ylabel("open-attribute diversity")
        ax.set_title(f"{split} captions")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
    for (system, split), style in zip(combos, itertools.cycle(("-o", "--o", "-s", "--s", "-^", "--^", "-D", "--D"))):
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
            pct = lambda v: "–" if v is None else f"{v:.1%}"  # noqa: E731
            lines.append(
                f"{r['split']:>8} {r['system']:<14} fidelity {_with_interval(r['fidelity'], r['fidelity_interval'])}  "
                f"open diversity {_with_interval(r['open_diversity'], r['open_diversity_interval'])}  "
                f"colour {pct(r['colour_accuracy'])}  shape {pct(r['shape_accuracy'])}  CLIP score {r['clip_score']:.3f}"
            )
    for d in summary.get("unclip_minus_glide_like", []):
        if d["open_diversity"] and d["fidelity"]:
            lines.append(
                f"{d['split']:>8} guidance {d['guidance']:g}: unclip − glide_like open diversity "
                f"{_with_interval(d['open_diversity']['mean'], d['open_diversity']['interval'])}, fidelity "
                f"{_with_interval(d['fidelity']['mean'], d['fidelity']['interval'])}"
            )
    if "prior" in summary:
        p = summary["prior"]
        lines.append(
            f"prior: cosine to the true image {p['cosine_predicted']:.3f} (text embedding {p['cosine_text']:.3f}, "
            f"unrelated image {_with_interval(p['cosine_unrelated'], None)}); open diversity of its samples "
            f"{_with_interval(p['prior']['open_diversity'], p['prior']['open_diversity_interval'])}"
        )
    for name, points in summary.get("diversity_at_equal_clip_score", {}).items():
        for p in points:
            if p["glide_like"] is not None:
                lines.append(
                    f"{p['split']:>8} guidance {p['guidance']:g}: diversity ({name}) at CLIP score {p['clip_score']:.3f}: "
                    f"unclip {p['unclip']:.3f}, glide_like {p['glide_like']:.3f}"
                )
    return "\n".join(lines)
