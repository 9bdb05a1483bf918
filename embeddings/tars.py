"""Reading the download's webdataset shards: samples in tar order, images by key, counts and splits.

A tar holds `key.jpg`, `key.txt` and `key.json` per sample (img2dataset's layout); beside it,
`NNNNN.parquet` lists every row with its status and `NNNNN_stats.json` marks the tar finished.
The shards folder may be a local path or an object-storage URI (embeddings/storage.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from embeddings import storage

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def iter_tar_samples(tar_path: str | Path) -> Iterator[dict]:
    """Samples of a tar in order: {'key', 'image' (bytes or None), 'caption', 'meta' (dict)}."""
    current: dict | None = None
    with storage.open_tar(tar_path) as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.rpartition(".")
            if current is not None and key != current["key"]:
                yield current
                current = None
            if current is None:
                current = {"key": key, "image": None, "caption": "", "meta": {}}
            data = tar.extractfile(member).read()
            if ext in IMAGE_EXTENSIONS:
                current["image"] = data
            elif ext == "txt":
                current["caption"] = data.decode("utf-8")
            elif ext == "json":
                current["meta"] = json.loads(data)
    if current is not None:
        yield current


def read_images(shards_dir: str | Path, wanted: dict[str, str]) -> dict[str, bytes]:
    """Image bytes for {key: shard name}, read from <shards_dir>/<shard>.tar by key."""
    by_shard: dict[str, set] = {}
    for key, shard in wanted.items():
        by_shard.setdefault(shard, set()).add(key)
    found: dict[str, bytes] = {}
    for shard, keys in by_shard.items():
        with storage.open_tar(storage.as_path(shards_dir) / f"{shard}.tar") as tar:
            for member in tar:
                stem, _, ext = member.name.rpartition(".")
                if stem in keys and ext in IMAGE_EXTENSIONS:
                    found[stem] = tar.extractfile(member).read()
    return found


def finished_tars(shards_dir) -> list:
    """Tars whose `_stats.json` exists (all tars where no stats are written at all), in name order."""
    tars = storage.listing(shards_dir, "*.tar")
    stats = {p.name.removesuffix("_stats.json") for p in storage.listing(shards_dir, "*_stats.json")}
    if not stats:
        return tars
    return [t for t in tars if t.stem in stats]


def tar_info(tar_path: str | Path) -> tuple[int, str | None]:
    """(samples in the tar, its split or None) from img2dataset's shard parquet; counts the tar otherwise."""
    tar_path = storage.as_path(tar_path)
    meta = tar_path.with_suffix(".parquet")
    if meta.is_file():
        names = storage.parquet_file(meta).schema_arrow.names
        table = storage.read_parquet(meta, columns=[c for c in ("status", "split") if c in names])
        status = table.column("status").to_pylist()
        splits = set(table.column("split").to_pylist()) if "split" in table.column_names else {None}
        if len(splits) > 1:
            raise ValueError(f"{tar_path} mixes splits {sorted(map(str, splits))}: trainers select splits per shard")
        return sum(s == "success" for s in status), splits.pop()
    return sum(1 for _ in iter_tar_samples(tar_path)), None
