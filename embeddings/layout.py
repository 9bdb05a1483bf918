"""Where a data set's files live: one home for the folder names of the contract.

data/<name>/data.yaml          the data set's config when make ingest or make download --url-list wrote it
data/<name>/urls.parquet       URL list (url, caption, split, passthrough columns)
data/<name>/source/            files served by the local HTTP server (synthetic source)
data/<name>/shards/            webdataset tars NNNNN.tar + img2dataset's NNNNN.parquet, NNNNN_stats.json
data/<name>/download.json      summary of the download job
data/<name>/embeddings/        NNNNN.parquet per tar + _manifest.json
data/<name>/index/             faiss indices, ids, index.json
data/<name>/views/             curated keep-lists: <view>.parquet + <view>.json (embeddings/views.py)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from embeddings import storage


@dataclass(frozen=True)
class DataLayout:
    """Paths of one data set under `root` (= data/<name>): local paths, or URIs when data_root is one."""

    root: Path

    @classmethod
    def of(cls, name: str, data_root: str | Path = "data") -> "DataLayout":
        return cls(storage.as_path(data_root) / name)

    @property
    def config(self) -> Path:
        return self.root / "data.yaml"

    @property
    def urls(self) -> Path:
        return self.root / "urls.parquet"

    @property
    def source(self) -> Path:
        return self.root / "source"

    @property
    def shards(self) -> Path:
        return self.root / "shards"

    @property
    def download_summary(self) -> Path:
        return self.root / "download.json"

    @property
    def embeddings(self) -> Path:
        return self.root / "embeddings"

    @property
    def index(self) -> Path:
        return self.root / "index"

    @property
    def views(self) -> Path:
        return self.root / "views"
