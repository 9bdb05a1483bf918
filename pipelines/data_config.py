"""Data set configs (configs/data/*.yaml): one file names a data set and configures its jobs.

    name: synthetic              # → data/<name>/
    data_root: data              # optional
    url_list: path/to/urls.parquet   # a real URL list; default: data/<name>/urls.parquet (make data)
    samples_per_shard: 500       # shared by the source and the download, so splits align with shards
    synthetic: {...}             # make data: keywords of pipelines.synthetic.generate
    download: {...}              # make download: keywords of pipelines.download.download
    embed: {...}                 # make embed: keywords of pipelines.embed.embed (encoder: {model, ...})
    index: {...}                 # make index: keywords of embeddings.index.build_indices

Every key is checked when the file is loaded; an unknown key, a missing URL list or a missing
column is a ConfigError that names it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from embeddings import index as index_job
from embeddings import storage
from embeddings.config import (
    ConfigError,
    check_keys,
    check_section,
    check_storage_paths,
    load_yaml,
    merge,
    parse_overrides,
)
from embeddings.encoders import EncoderSpec
from embeddings.layout import DataLayout
from pipelines import download as download_job
from pipelines import embed as embed_job
from pipelines import synthetic

# Keywords the job sets itself from the data config, so they may not appear in a section.
_SET_BY_JOB = (
    "output_dir",
    "url_list",
    "samples_per_shard",
    "summary_path",
    "serve_root",
    "shards_dir",
    "embeddings_dir",
    "index_dir",
)


@dataclass
class DataConfig:
    """A validated data set config."""

    name: str
    data_root: str = "data"
    url_list: str | None = None
    samples_per_shard: int = 500
    synthetic: dict[str, Any] | None = None
    download: dict[str, Any] = field(default_factory=dict)
    embed: dict[str, Any] = field(default_factory=dict)
    index: dict[str, Any] = field(default_factory=dict)

    @property
    def layout(self) -> DataLayout:
        return DataLayout.of(self.name, self.data_root)

    @property
    def url_list_path(self) -> Path:
        return storage.as_path(self.url_list) if self.url_list else self.layout.urls


def load_data_config(path: str | Path, overrides: list[str] | None = None) -> DataConfig:
    """Load and validate a data config; `overrides` are 'key.sub=value' strings applied on top."""
    raw = merge(load_yaml(path), parse_overrides(overrides))
    check_keys(raw, [f.name for f in fields(DataConfig)], str(path))
    if not raw.get("name"):
        raise ConfigError(f"{path}: missing key 'name' (the data set's folder under data/)")
    check_storage_paths(raw, str(path))
    if raw.get("synthetic") is not None:
        check_section(raw["synthetic"], synthetic.generate, f"{path}: synthetic", exclude=_SET_BY_JOB)
    check_section(raw.get("download"), download_job.download, f"{path}: download", exclude=_SET_BY_JOB)
    check_section(raw.get("embed"), embed_job.embed, f"{path}: embed", exclude=_SET_BY_JOB)
    check_section(raw.get("index"), index_job.build_indices, f"{path}: index", exclude=_SET_BY_JOB)
    encoder = (raw.get("embed") or {}).get("encoder")
    if encoder is not None:
        check_keys(encoder, list(EncoderSpec.__dataclass_fields__), f"{path}: embed.encoder")
    config = DataConfig(**raw)
    if config.url_list is not None:
        download_job.read_url_list(
            config.url_list,
            config.download.get("url_col", "url"),
            config.download.get("caption_col", "caption"),
        )
    return config


def run_data(config: DataConfig) -> dict:
    """`make data`: render the synthetic source of this config."""
    if config.synthetic is None:
        raise ConfigError(f"data set {config.name!r} has no 'synthetic' section: nothing to render")
    if storage.is_uri(config.layout.root):
        raise ConfigError(
            f"make data renders the synthetic source into a local folder that a local server serves; "
            f"data_root {config.data_root!r} is a URI: render with a local data_root, then download "
            f'with SET="data_root={config.data_root} url_list=<local data_root>/{config.name}/urls.parquet"'
        )
    return synthetic.generate(config.layout.root, samples_per_shard=config.samples_per_shard, **config.synthetic)


def run_download(config: DataConfig) -> dict:
    """`make download`: download this config's URL list into data/<name>/shards/."""
    if not config.url_list_path.is_file() and config.synthetic is not None:
        raise ConfigError(f"URL list not found: {config.url_list_path}; run `make data` first")
    return download_job.download(
        config.url_list_path,
        config.layout.shards,
        samples_per_shard=config.samples_per_shard,
        summary_path=config.layout.download_summary,
        **config.download,
    )


def run_embed(config: DataConfig) -> dict:
    """`make embed`: embed data/<name>/shards/ into data/<name>/embeddings/."""
    return embed_job.embed(config.layout.shards, config.layout.embeddings, **config.embed)


def run_index(config: DataConfig) -> dict:
    """`make index`: faiss indices over data/<name>/embeddings/ into data/<name>/index/."""
    return index_job.build_indices(config.layout.embeddings, config.layout.index, **config.index)
