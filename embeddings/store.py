"""The embedding shard contract: schema, atomic writes, per-shard records, the manifest, reads.

    data/<name>/embeddings/NNNNN.parquet       one per data/<name>/shards/NNNNN.tar:
        key (string), caption (string), image_embedding, text_embedding
        (fixed_size_list<float16>[D], or float32 by config; L2-normalised), image_norm, text_norm
        (float32: the raw CLIP embeddings' norms, so raw = unit × norm, what published priors such as
        Karlo's and Kandinsky's read; absent in shards made before them and in imports of vectors that
        came without them), passthrough columns
    data/<name>/embeddings/NNNNN_record.json   written after the parquet: rows written, skipped by reason
    data/<name>/embeddings/_manifest.json      written by the driver alone: encoder, dtype, records

A shard is done when its record exists. Every write is atomic (embeddings/storage.py: a temporary
name renamed locally, one PUT on object storage), so a killed job leaves either a whole shard or none.
The folder may be a local path or an object-storage URI.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

from embeddings import storage
from embeddings.config import ConfigError

EMBEDDING_COLUMNS = ("image_embedding", "text_embedding")
NORM_COLUMNS = {"image_embedding": "image_norm", "text_embedding": "text_norm"}
MANIFEST = "_manifest.json"
RECORD_SUFFIX = "_record.json"
_DTYPES = {"float16": (pa.float16(), np.float16), "float32": (pa.float32(), np.float32)}


def write_json(path, obj) -> None:
    """Atomic JSON write (storage.write_bytes), keys sorted so reruns compare equal."""
    storage.write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def vectors_to_arrow(vectors: np.ndarray, dtype: str = "float16") -> pa.FixedSizeListArray:
    """(N, D) float array → fixed_size_list<dtype>[D]."""
    arrow_type, numpy_type = _DTYPES[dtype]
    n, dim = vectors.shape
    flat = pa.array(np.ascontiguousarray(vectors, dtype=numpy_type).reshape(-1), type=arrow_type)
    return pa.FixedSizeListArray.from_arrays(flat, dim)


def arrow_to_vectors(column: pa.ChunkedArray | pa.Array, dtype=np.float32) -> np.ndarray:
    """fixed_size_list column → (N, D) numpy array in `dtype`."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    dim = column.type.list_size
    return column.values.to_numpy(zero_copy_only=False).reshape(-1, dim).astype(dtype, copy=False)


def require_norms(column_names: list[str], where: str = "these embeddings", columns=tuple(NORM_COLUMNS)) -> None:
    """Refuse embeddings that lack the norm column of any of `columns` (raw = unit × norm needs it)."""
    for column in columns:
        if NORM_COLUMNS[column] not in column_names:
            raise ConfigError(
                f"{where} carry no {NORM_COLUMNS[column]} column (embedded before norms were recorded, or imported): "
                "the raw CLIP vectors a published prior reads cannot be recovered; `make reset-embeddings` and "
                "`make embed` again"
            )


def raw_vectors(table: pa.Table, column: str, where: str = "these embeddings") -> np.ndarray:
    """The raw CLIP embeddings (N, D) of `column` ("image_embedding" or "text_embedding"): unit × norm."""
    require_norms(table.column_names, where, (column,))
    norm = NORM_COLUMNS[column]
    return arrow_to_vectors(table.column(column)) * table.column(norm).to_numpy()[:, None]


def shard_name(path) -> str:
    """'00012' for .../00012.tar or .../00012.parquet (a path or a URI)."""
    return str(path).rstrip("/").rsplit("/", 1)[-1].split(".")[0]


def write_shard(folder, name: str, table: pa.Table, record: dict) -> None:
    """Write one embedding shard, then its record (which marks it done)."""
    folder = storage.as_path(folder)
    storage.make_folder(folder)
    storage.write_parquet(folder / f"{name}.parquet", table)
    write_json(folder / f"{name}{RECORD_SUFFIX}", record)


def forget_shards(folder, names: list[str]) -> None:
    """Remove the embeddings of shards `names`, the manifest first marked incomplete (so trainers wait for
    the rerun that embeds them again), each record before its Parquet (a half-removed shard is never done)."""
    folder = storage.as_path(folder)
    if not names or not (folder / MANIFEST).exists():
        return
    manifest = read_manifest(folder)
    write_manifest(folder, manifest["encoder"], manifest["dtype"], manifest["records"], False, manifest.get("damaged"))
    for name in names:
        storage.remove(folder / f"{name}{RECORD_SUFFIX}")
        storage.remove(folder / f"{name}.parquet")


def done_shards(folder) -> dict[str, dict]:
    """Records of the finished shards, by shard name."""
    return {
        p.name.removesuffix(RECORD_SUFFIX): json.loads(p.read_text())
        for p in storage.listing(folder, f"*{RECORD_SUFFIX}")
    }


def shard_paths(folder) -> list:
    """The finished embedding shards of a folder (paths or URIs), in name order; only lists the
    records, without reading them (one request per shard saved on object storage)."""
    folder = storage.as_path(folder)
    return [
        folder / f"{p.name.removesuffix(RECORD_SUFFIX)}.parquet" for p in storage.listing(folder, f"*{RECORD_SUFFIX}")
    ]


def write_manifest(
    folder, encoder: dict, dtype: str, records: dict[str, dict], complete: bool = True, damaged: dict | None = None
) -> dict:
    """The driver's manifest: the encoder, the stored dtype, totals, every shard's record, and the shards
    that could not be read ({shard: reason}; the manifest is complete only without them)."""
    manifest = {
        "complete": complete,
        "damaged": dict(sorted((damaged or {}).items())),
        "encoder": encoder,
        "dim": encoder["dim"],
        "dtype": dtype,
        "normalized": True,
        "shards": len(records),
        "rows": sum(r["rows_written"] for r in records.values()),
        "skipped": sum(sum(r["skipped"].values()) for r in records.values()),
        "records": records,
    }
    write_json(storage.as_path(folder) / MANIFEST, manifest)
    return manifest


def read_manifest(folder) -> dict:
    """The manifest of an embedding folder; a clear error when there is none."""
    path = storage.as_path(folder) / MANIFEST
    if not path.is_file():
        raise ConfigError(f"no {MANIFEST} in {folder}: run `make embed` first")
    return json.loads(path.read_text())


def complete_manifest(folder) -> dict:
    """The manifest of an embedding folder whose job finished every shard (what trainers read); else a
    ConfigError naming the shards that are missing."""
    manifest = read_manifest(folder)
    missing = sorted(set(manifest["records"]) - {shard_name(p) for p in shard_paths(folder)})
    if manifest.get("complete", True) and not missing:
        return manifest
    if missing:
        raise ConfigError(
            f"the embeddings in {folder} are incomplete: shard(s) {', '.join(missing)} in the manifest have no "
            "embeddings on disk; run `make embed` for this data set to embed them again"
        )
    damaged = manifest.get("damaged") or {}
    if damaged:
        raise ConfigError(
            f"the embeddings in {folder} are incomplete: shard(s) {', '.join(sorted(damaged))} could not be read "
            "(damaged tars); repair and finish them as `make embed` printed, then train"
        )
    raise ConfigError(
        f"the embeddings in {folder} are incomplete: the embed job did not finish ({manifest['shards']} shards "
        "done); run `make embed` again to finish it"
    )


def check_compatible(manifest: dict, encoder: dict) -> None:
    """Raise when embeddings made by one encoder are to be used or extended with another."""
    if manifest["dim"] != encoder["dim"]:
        raise ConfigError(
            f"embedding dim {manifest['dim']} in the manifest disagrees with the model's dim {encoder['dim']} "
            f"({encoder.get('model')})"
        )
    if manifest["encoder"]["checksum"] != encoder["checksum"]:
        raise ConfigError(
            f"embeddings were made by another CLIP (checksum {manifest['encoder']['checksum'][:12]}…, "
            f"model {manifest['encoder'].get('model')}); this one is {encoder['checksum'][:12]}… ({encoder.get('model')})"
        )


def _unreadable(path, err: Exception) -> ConfigError:
    name = shard_name(path)
    return ConfigError(
        f"embedding shard {path} cannot be read ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}): "
        f"it is damaged; `make embed REDO={name}` (with this data set's NAME= or CONFIG=) embeds that shard again"
    )


def shard_file(path):
    """An embedding shard's Parquet file (metadata, schema); a file that is not readable Parquet is a
    ConfigError that names it and the command that redoes it."""
    try:
        return storage.parquet_file(path)
    except (pa.ArrowException, OSError) as err:
        raise _unreadable(path, err) from err


def read_shard(path, columns: list[str] | None = None, filters=None) -> pa.Table:
    """One embedding shard's rows (some columns, pyarrow filters); a damaged file is a ConfigError naming it."""
    try:
        return storage.read_parquet(path, columns=columns, filters=filters)
    except (pa.ArrowException, OSError) as err:
        raise _unreadable(path, err) from err


def read_table(folder, columns: list[str] | None = None, filters=None, with_shard: bool = False) -> pa.Table:
    """All finished shards of a folder as one table (some columns, pyarrow filters, a `shard` column)."""
    paths = shard_paths(folder)
    if not paths:
        raise ConfigError(f"no finished embedding shards in {folder}: run `make embed` first")
    tables = []
    for path in paths:
        table = read_shard(path, columns=columns, filters=filters)
        if with_shard:
            table = table.append_column("shard", pa.array([shard_name(path)] * table.num_rows, pa.string()))
        tables.append(table)
    return pa.concat_tables(tables, promote_options="default")
