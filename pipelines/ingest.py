"""`make ingest FOLDER=...`: a local folder of images with caption files → the same webdataset shards.

Each image (jpg, jpeg, png, webp) with a `<stem>.txt` beside it becomes one row of
data/<name>/urls.parquet, its URL the path relative to the folder; the folder is then served on
127.0.0.1 and downloaded like any URL list, so resizing, keys, stats and resume are the download
job's. An image without a caption file is skipped and counted.
"""

from __future__ import annotations

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
    return pa.Table.from_pylist(rows, schema=pa.schema([("url", pa.string()), ("caption", pa.string())])), skipped


def ingest(folder: str | Path, name: str, *, data_root: str | Path = "data", **download_options) -> dict:
    """Shard a captioned image folder into data/<name>/; `download_options` go to the download job."""
    layout = DataLayout.of(name, data_root)
    table, skipped = list_folder(folder)
    layout.root.mkdir(parents=True, exist_ok=True)
    write_parquet(layout.urls, table)
    summary = download(
        layout.urls, layout.shards, serve_root=folder, summary_path=layout.download_summary, **download_options
    )
    summary["skipped_without_caption"] = skipped
    return summary
