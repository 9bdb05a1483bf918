"""clip-retrieval's layout, both ways, so the tools around it read our output and we read theirs.

    <folder>/img_emb/img_emb_N.npy      (rows, D) image embeddings
    <folder>/text_emb/text_emb_N.npy    (rows, D) text embeddings
    <folder>/metadata/metadata_N.parquet   one row per embedding row: key, caption, passthrough columns

The layout is positional: row r of img_emb_N is row r of metadata_N. Export writes our `key` into
the metadata, so nothing is lost; import takes keys from there (and makes positional keys, with a
warning, where a producer wrote none). N is our shard number, so file N is embedding shard NNNNN.
"""

from __future__ import annotations

import io
import re
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from embeddings import storage, store
from embeddings.config import ConfigError
from pipelines.download import shard_split

SUBFOLDERS = {"image_embedding": ("img_emb", "img_emb"), "text_embedding": ("text_emb", "text_emb")}


def _save_npy(path, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array)
    storage.write_bytes(path, buffer.getvalue())


def _load_npy(path) -> np.ndarray:
    with storage.as_path(path).open("rb") as f:
        return np.load(io.BytesIO(f.read()))


def export_clip_retrieval(embeddings_dir: str | Path, output_dir: str | Path) -> dict:
    """Write every finished embedding shard in clip-retrieval's layout; returns counts."""
    output_dir = storage.as_path(output_dir)
    manifest = store.read_manifest(embeddings_dir)
    numpy_dtype = np.float16 if manifest["dtype"] == "float16" else np.float32
    for folder in [f for f, _ in SUBFOLDERS.values()] + ["metadata"]:
        storage.make_folder(output_dir / folder)
    rows, paths = 0, store.shard_paths(embeddings_dir)
    for path in tqdm(paths, desc="export", unit="shard"):
        n = int(store.shard_name(path))
        table = storage.read_parquet(path)
        for column, (folder, prefix) in SUBFOLDERS.items():
            _save_npy(
                output_dir / folder / f"{prefix}_{n}.npy", store.arrow_to_vectors(table.column(column), numpy_dtype)
            )
        metadata = table.drop_columns(list(SUBFOLDERS))
        storage.write_parquet(output_dir / "metadata" / f"metadata_{n}.parquet", metadata)
        rows += table.num_rows
    return {"shards": len(paths), "rows": rows, "dim": manifest["dim"]}


def _numbered(folder, prefix: str, suffix: str) -> dict[int, Path]:
    pattern = re.compile(rf"^{prefix}_(\d+){re.escape(suffix)}$")
    return {int(m.group(1)): p for p in storage.listing(folder, f"{prefix}_*{suffix}") if (m := pattern.match(p.name))}


def import_clip_retrieval(
    source_dir: str | Path,
    output_dir: str | Path,
    *,
    encoder: dict | None = None,
    dtype: str = "float16",
    val_fraction: float = 0.01,
) -> dict:
    """Turn a clip-retrieval folder into embedding shards + manifest; returns the manifest.

    `encoder` describes the CLIP that made the embeddings (model, weights; the trainers encode the
    empty caption and text tokens with it). Vectors are L2-normalised again on the way in. Metadata
    without a `split` column gets one by part number, as a URL list without one does (`shard_split`).
    """
    source_dir, output_dir = storage.as_path(source_dir), storage.as_path(output_dir)
    images = _numbered(source_dir / "img_emb", "img_emb", ".npy")
    texts = _numbered(source_dir / "text_emb", "text_emb", ".npy")
    metadata = _numbered(source_dir / "metadata", "metadata", ".parquet")
    if not images:
        raise ConfigError(f"{source_dir}: no img_emb/img_emb_N.npy files (not a clip-retrieval folder?)")
    missing = sorted(set(images) - set(texts)) or sorted(set(images) - set(metadata))
    if missing:
        raise ConfigError(
            f"{source_dir}: part {missing[0]} has img_emb but no text_emb or metadata; the prior needs both"
        )
    records, dim = {}, None
    for n in tqdm(sorted(images), desc="import", unit="shard"):
        z_i = _load_npy(images[n]).astype(np.float32)
        z_t = _load_npy(texts[n]).astype(np.float32)
        meta = storage.read_parquet(metadata[n])
        if not (len(z_i) == len(z_t) == meta.num_rows):
            raise ConfigError(
                f"{source_dir}: part {n} has {len(z_i)} image, {len(z_t)} text and {meta.num_rows} metadata rows"
            )
        dim = z_i.shape[1]
        if "key" not in meta.column_names:
            warnings.warn(f"metadata_{n}.parquet has no key column: keys made from the position", stacklevel=2)
            meta = meta.append_column("key", pa.array([f"{n:05d}{r:06d}" for r in range(meta.num_rows)]))
        if "caption" not in meta.column_names:
            raise ConfigError(f"{source_dir}: metadata_{n}.parquet has no caption column")
        if "split" not in meta.column_names:
            if len(images) < 2:
                raise ConfigError(
                    f"{source_dir}: one part without a split column cannot be split into train and val by part"
                )
            meta = meta.append_column("split", pa.array([shard_split(n, val_fraction)] * meta.num_rows))
        z_i /= np.linalg.norm(z_i, axis=1, keepdims=True).clip(1e-12)
        z_t /= np.linalg.norm(z_t, axis=1, keepdims=True).clip(1e-12)
        table = pa.table(
            {
                "key": meta.column("key").cast(pa.string()),
                "caption": meta.column("caption").cast(pa.string()),
                "image_embedding": store.vectors_to_arrow(z_i, dtype),
                "text_embedding": store.vectors_to_arrow(z_t, dtype),
            }
        )
        for name in meta.column_names:
            if name not in table.column_names:
                table = table.append_column(name, meta.column(name))
        name = f"{n:05d}"
        records[name] = {"shard": name, "rows_written": table.num_rows, "skipped": {}, "imported_from": str(source_dir)}
        store.write_shard(output_dir, name, table, records[name])
    info = {
        "model": None,
        "checksum": f"unknown (imported from {source_dir})",
        **(encoder or {}),
        "dim": dim,
        "normalized": True,
    }
    return store.write_manifest(output_dir, info, dtype, records)
