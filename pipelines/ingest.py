"""`make ingest FOLDER=...`: a local folder of images with caption files → the same webdataset shards.

Each image (jpg, jpeg, png, webp) with a `<stem>.txt` beside it becomes one row of
data/<name>/urls.parquet, its URL the path relative to the folder; the folder is then served on
127.0.0.1 and downloaded like any URL list, so resizing, keys, stats, resume and the split by shard
are the download job's. An image without a caption file is skipped and counted. Rows go in an order
fixed by a hash of each path, so every shard, the validation shard among them, is a spread of the
folder rather than its first names; a folder of under 5 000 images gets smaller shards than 500
(`shard_size`: ten of them), so that its validation shard is about a tenth of it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow as pa

from embeddings import storage
from embeddings.config import ConfigError
from embeddings.storage import read_parquet, write_parquet

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def list_folder(folder: str | Path) -> tuple[pa.Table, int]:
    """URL rows (url, caption) for captioned images under `folder`, sorted; and the count skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"folder not found: {folder}")
    rows, skipped = [], 0
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        text_file = path.with_suffix(".txt")
        if not text_file.is_file():
            skipped += 1
            continue
        rows.append({"url": path.relative_to(folder).as_posix(), "caption": text_file.read_text().strip()})
    if not rows:
        raise ValueError(f"{folder}: no image with a caption file beside it (image.jpg + image.txt)")
    rows.sort(key=lambda row: hashlib.sha256(row["url"].encode()).hexdigest())
    return pa.Table.from_pylist(rows, schema=pa.schema([("url", pa.string()), ("caption", pa.string())])), skipped


def shard_size(rows: int, most: int = 500, shards: int = 10) -> int:
    """Samples per shard for a folder of `rows` images: `most`, or fewer so that it fills `shards` shards."""
    return max(1, min(most, -(-rows // shards)))


def ingest(folder: str | Path, name: str, **settings) -> dict:
    """Shard a captioned image folder into data/<name>/ and write its data config, data/<name>/data.yaml
    (so every later job takes NAME=<name>); `settings` are data-config keys (data_root, samples_per_shard,
    download: {image_size, ...}); samples_per_shard defaults to `shard_size` of the folder. A folder whose
    listing changed since shards were made from it is refused: its rows would land in other shards.
    Returns the download summary."""
    from pipelines.data_config import new_data_set, run_download

    folder = Path(folder).expanduser().resolve()
    table, skipped = list_folder(folder)
    settings = dict(settings, folder=str(folder))
    settings.setdefault("samples_per_shard", shard_size(table.num_rows))
    comment = (
        f"Written by make ingest FOLDER={folder} NAME={name}: the data set {name!r}; every target takes NAME={name}."
    )
    config = new_data_set(name, settings, comment)
    layout = config.layout
    if layout.urls.exists() and storage.listing(layout.shards, "*.tar") and not read_parquet(layout.urls).equals(table):
        raise ConfigError(
            f"{folder} has changed since data/{name}/ was made from it: ingest it under another NAME, or remove "
            f"{layout.root}/ first"
        )
    storage.make_folder(layout.root)
    write_parquet(layout.urls, table)
    summary = run_download(config)
    summary["skipped_without_caption"] = skipped
    return summary
