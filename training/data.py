"""Shard lists and range readers for the trainers: webdataset tars and embedding Parquet shards.

Every reader takes a `Shard` and a [start, stop) range of its samples (in file order) and yields raw
records, so `ShardStream` can split an epoch across ranks and workers below the shard.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
from PIL import Image

from embeddings import store, views
from embeddings.config import ConfigError
from embeddings.tars import IMAGE_EXTENSIONS, finished_tars, iter_tar_samples, tar_info, tar_members
from training.streaming import Shard


def check_val_split(split: str) -> None:
    """Refuse a validation split that is the training split: train and val never overlap."""
    if split == "train":
        raise ConfigError("val_split 'train': validation would read the very samples the model trains on")


def unsplit(shard) -> ConfigError:
    """The error for a shard whose samples have no split (they would be in train and val at once)."""
    return ConfigError(
        f"{shard} has no split, so its samples would be trained on and validated against at once: download "
        "the data set again (a URL list without a `split` column gets one per shard, download.val_fraction)"
    )


def empty_view(split: str | None, where) -> ConfigError:
    """The error for a view that keeps none of a split's samples (a trainer would have nothing to read)."""
    return ConfigError(f"the view keeps no {split or ''} samples of {where}: curate it with looser settings")


def view_keys(layout, view: str | None) -> dict[str, frozenset[str]] | None:
    """A view's kept keys per shard name, checked against the data set's embeddings (None without a view)."""
    if not view:
        return None
    return views.kept_keys(layout.views, view, store.complete_manifest(layout.embeddings))


def tar_shards(shards_dir: str | Path, split: str | None = "train", keep: dict | None = None) -> list[Shard]:
    """Finished tars of one split (every tar when `split` is None); a tar without a split is an error. With
    `keep` (view_keys), each tar counts only its kept samples and carries them (Shard.keep)."""
    shards = []
    for tar in finished_tars(shards_dir):
        count, tar_split = tar_info(tar)
        if split is not None and tar_split is None:
            raise unsplit(tar)
        if split is None or tar_split == split:
            if keep is None:
                shards.append(Shard(str(tar), count))
                continue
            kept = keep.get(store.shard_name(tar), frozenset())
            count = sum(key in kept for key in tar_image_keys(tar))
            if count:
                shards.append(Shard(str(tar), count, kept))
    if not shards and keep is not None:
        raise empty_view(split, shards_dir)
    if not shards:
        raise FileNotFoundError(f"no {split or ''} shards in {shards_dir}: run `make download` first")
    return shards


def tar_image_keys(tar_path: str | Path) -> list[str]:
    """Keys of the samples that have an image, in tar order (reads headers only)."""
    keys = []
    for member, _ in tar_members(tar_path, read=False):
        key, _, ext = member.name.rpartition(".")
        if ext in IMAGE_EXTENSIONS:
            keys.append(key)
    return keys


def read_tar_range(shard: Shard, start: int, stop: int) -> Iterator[dict]:
    """Samples number start..stop-1 (those with an image, and kept by the shard's view, in tar order) of a tar:
    raw bytes, unparsed."""
    position = 0
    for sample in iter_tar_samples(shard.path):
        if sample["image"] is None or not shard.keeps(sample["key"]):
            continue
        if position >= stop:
            return
        if position >= start:
            yield sample
        position += 1


def decode_image(data: bytes) -> Image.Image:
    """JPEG/PNG bytes → RGB PIL image."""
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


def embedding_shards(embeddings_dir: str | Path, split: str | None = "train", keep: dict | None = None) -> list[Shard]:
    """Finished embedding shards holding `split` (every shard when None; rows counted from the Parquet
    metadata); a shard without a split is an error. With `keep` (view_keys) each counts and carries its kept rows."""
    shards = []
    for path in store.shard_paths(embeddings_dir):
        meta = store.shard_file(path)
        if split is not None:
            if "split" not in meta.schema_arrow.names:
                raise unsplit(path)
            splits = set(store.read_shard(path, columns=["split"]).column("split").to_pylist())
            if len(splits) > 1:
                raise ValueError(f"{path} mixes splits {sorted(map(str, splits))}: trainers select splits per shard")
            if splits == {None}:
                raise unsplit(path)
            if splits != {split}:
                continue
        if keep is None:
            shards.append(Shard(str(path), meta.metadata.num_rows))
        elif kept := keep.get(store.shard_name(path)):
            count = sum(k in kept for k in store.read_shard(path, columns=["key"]).column("key").to_pylist())
            if count:
                shards.append(Shard(str(path), count, kept))
    if not shards and keep is not None:
        raise empty_view(split, embeddings_dir)
    if not shards:
        raise FileNotFoundError(f"no {split or ''} embedding shards in {embeddings_dir}: run `make embed` first")
    return shards


def require_norm_columns(shards: list[Shard]) -> None:
    """Refuse, before training, embedding shards that lack the norm columns a model reading raw CLIP vectors
    (unit × norm) needs; the error names the shard."""
    for shard in shards:
        store.require_norms(store.shard_file(shard.path).schema_arrow.names, str(shard.path))


def read_parquet_range(shard: Shard, start: int, stop: int, columns: list[str] | None = None) -> Iterator[dict]:
    """Rows start..stop-1 (of those the shard's view keeps) of an embedding shard as dicts (embeddings as float32
    row vectors)."""
    if shard.keep is None:
        table = store.read_shard(shard.path, columns=columns).slice(start, stop - start)
    else:
        table = store.read_shard(shard.path, columns=None if columns is None else sorted({"key", *columns}))
        table = table.filter(pa.array([shard.keeps(k) for k in table.column("key").to_pylist()]))
        table = table.slice(start, stop - start).select(columns or table.column_names)
    names = table.column_names
    values = [
        list(store.arrow_to_vectors(table.column(c))) if c in store.EMBEDDING_COLUMNS else table.column(c).to_pylist()
        for c in names
    ]
    for row in zip(*values):
        yield dict(zip(names, row))
