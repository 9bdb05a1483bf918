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

from embeddings.layout import DataLayout
from embeddings.storage import write_parquet
from pipelines.download import download

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


def ingest(folder: str | Path, name: str, *, data_root: str | Path = "data", **download_options) -> dict:
    """Shard a captioned image folder into data/<name>/; `download_options` go to the download job
    (`samples_per_shard` among them: default `shard_size` of the folder)."""
    layout = DataLayout.of(name, data_root)
    table, skipped = list_folder(folder)
    layout.root.mkdir(parents=True, exist_ok=True)
    write_parquet(layout.urls, table)
    download_options.setdefault("samples_per_shard", shard_size(table.num_rows))
    summary = download(
        layout.urls, layout.shards, serve_root=folder, summary_path=layout.download_summary, **download_options
    )
    summary["skipped_without_caption"] = skipped
    return summary
