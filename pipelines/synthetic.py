"""`make data`: render the synthetic shapes source and write its img2dataset-ready URL list.

Writes under data/<name>/:
    source/images/sNNNNNNN.jpg   the images the local server serves (and the planned bad files)
    source/source.json           what was planned: counts per split, the bad URLs and their kinds
    urls.parquet                 url (relative to data/<name>/), caption, split, sample_id, attributes,
                                 and `named`: the attributes the caption names (the rest it leaves open)

Rows are ordered val, heldout, train, and the first two are whole shards, so no shard mixes
splits. Each sample has its own random generator seeded by (seed, index): the same seed gives
byte-identical files whatever the number of worker processes.
"""

from __future__ import annotations

import json
import math
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from embeddings.layout import DataLayout
from embeddings.storage import write_bytes, write_parquet
from pipelines import shapes

SPLITS = ("val", "heldout", "train")
BAD_KINDS = ("404", "html", "truncated")
_HTML_PAGE = b"<!doctype html><html><head><title>Moved</title></head><body>This page has moved.</body></html>\n"


def plan_splits(n_samples: int, samples_per_shard: int, val_samples: int, heldout_samples: int) -> list[str]:
    """Split of every row: val and heldout rounded up to whole shards, then train for the rest."""
    whole = lambda n: math.ceil(n / samples_per_shard) * samples_per_shard  # noqa: E731
    n_val, n_heldout = whole(val_samples), whole(heldout_samples)
    n_train = n_samples - n_val - n_heldout
    if n_train <= 0:
        raise ValueError(
            f"n_samples={n_samples} leaves no training samples after {n_val} val and {n_heldout} heldout "
            f"(each rounded up to whole shards of {samples_per_shard})"
        )
    return ["val"] * n_val + ["heldout"] * n_heldout + ["train"] * n_train


def plan_bad(n_samples: int, bad_fraction: float, seed: int) -> dict[int, str]:
    """Row index → kind of planned failure ('404', 'html', 'truncated'), kinds in turn."""
    n_bad = round(n_samples * bad_fraction)
    rows = np.random.default_rng([seed, 0xBAD]).choice(n_samples, size=n_bad, replace=False)
    return {int(row): BAD_KINDS[i % len(BAD_KINDS)] for i, row in enumerate(sorted(rows))}


def sample_row(
    index: int, split: str, seed: int, two_object_fraction: float, naming: dict[str, float] | None = None
) -> tuple[shapes.Scene, str, tuple[str, ...]]:
    """The scene of row `index`, its caption and the attributes the caption names, from the row's own generator."""
    rng = np.random.default_rng([seed, index])
    n_objects = 2 if split != "heldout" and rng.random() < two_object_fraction else 1
    scene = shapes.sample_scene(rng, n_objects=n_objects, heldout=split == "heldout")
    named = shapes.choose_named(scene, rng, naming)
    return scene, shapes.caption(scene, named, rng), named


def check_naming(naming: dict | None) -> dict[str, float]:
    """NAMING updated with `naming`, refusing unknown keys and probabilities outside [0, 1]."""
    naming = dict(naming or {})
    unknown = sorted(set(naming) - set(shapes.NAMING))
    if unknown:
        raise ValueError(f"synthetic.naming: unknown key {unknown[0]!r}; known: {', '.join(shapes.NAMING)}")
    for key, p in naming.items():
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
            raise ValueError(f"synthetic.naming.{key} = {p!r}: a probability in [0, 1] is expected")
    return {**shapes.NAMING, **{k: float(v) for k, v in naming.items()}}


def _attributes(scene: shapes.Scene) -> dict:
    row = dict.fromkeys(shapes.SCENE_COLUMNS)
    row["background"], row["n_objects"] = scene.background, len(scene.objects)
    for i, obj in enumerate(scene.objects):
        suffix = "" if i == 0 else f"_{i + 1}"
        for attr in ("shape", "colour", "size", "position"):
            row[attr + suffix] = getattr(obj, attr)
    return row


def _render_chunk(job: tuple) -> list[dict]:
    """Render rows [start, stop) to files (bad rows as their planned failure); returns their URL rows."""
    start, stop, splits, bad, seed, two_object_fraction, naming, image_size, quality, root, prefix = job
    rows = []
    for index in range(start, stop):
        split = splits[index - start]
        scene, text, named = sample_row(index, split, seed, two_object_fraction, naming)
        url = f"{prefix}/{sample_id(index)}.jpg"
        row = {"url": url, "caption": text, "split": split, "sample_id": sample_id(index), **_attributes(scene)}
        rows.append({**row, shapes.NAMED_COLUMN: " ".join(named)})
        path, kind = Path(root) / url, bad.get(index)
        if kind == "404":
            path.unlink(missing_ok=True)
        elif kind == "html":
            write_bytes(path, _HTML_PAGE)
        else:
            data = shapes.encode_jpeg(shapes.render(scene, image_size), quality)
            write_bytes(path, data[: len(data) // 2] if kind == "truncated" else data)
    return rows


def sample_id(index: int) -> str:
    """Stable id of a synthetic row: 's' and the zero-padded row index."""
    return f"s{index:07d}"


def generate(
    output_dir: str | Path,
    *,
    n_samples: int = 10_000,
    image_size: int = 64,
    samples_per_shard: int = 500,
    val_samples: int = 1_500,
    heldout_samples: int = 500,
    two_object_fraction: float = 0.2,
    naming: dict[str, float] | None = None,
    bad_fraction: float = 0.02,
    seed: int = 0,
    jpeg_quality: int = 95,
    workers: int | None = None,
) -> dict:
    """Render the source into `output_dir` (= data/<name>) and write urls.parquet; returns the plan.

    `naming` overrides shapes.NAMING: how often a caption names each attribute."""
    naming = check_naming(naming)
    layout = DataLayout(Path(output_dir))
    images = layout.source / "images"
    images.mkdir(parents=True, exist_ok=True)
    prefix = images.relative_to(layout.root).as_posix()  # URLs are relative to data/<name>/
    splits = plan_splits(n_samples, samples_per_shard, val_samples, heldout_samples)
    bad = plan_bad(n_samples, bad_fraction, seed)

    chunk = 250
    jobs = [
        (
            s,
            min(s + chunk, n_samples),
            splits[s : s + chunk],
            {i: k for i, k in bad.items() if s <= i < s + chunk},
            seed,
            two_object_fraction,
            naming,
            image_size,
            jpeg_quality,
            str(layout.root),
            prefix,
        )
        for s in range(0, n_samples, chunk)
    ]
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    rows: list[dict] = []
    with tqdm(total=n_samples, desc="render", unit="img") as bar, ProcessPoolExecutor(workers) as pool:
        for chunk_rows in pool.map(_render_chunk, jobs):
            rows.extend(chunk_rows)
            bar.update(len(chunk_rows))
    table = pa.Table.from_pylist(rows, schema=_schema())
    write_parquet(layout.urls, table)

    plan = {
        "n_samples": n_samples,
        "image_size": image_size,
        "samples_per_shard": samples_per_shard,
        "seed": seed,
        "splits": {s: splits.count(s) for s in SPLITS},
        "bad": {sample_id(i): kind for i, kind in sorted(bad.items())},
        "naming": naming,
        "heldout_pairs": sorted(map(list, shapes.HELDOUT_PAIRS)),
    }
    write_bytes(layout.source / "source.json", json.dumps(plan, indent=1, sort_keys=True).encode())
    return plan


def _schema() -> pa.Schema:
    """Column types of urls.parquet: strings, and n_objects as int32."""
    names = ["url", "caption", "split", "sample_id", *shapes.SCENE_COLUMNS, shapes.NAMED_COLUMN]
    return pa.schema([pa.field(n, pa.int32() if n == "n_objects" else pa.string()) for n in names])
