"""Data set configs: one file names a data set and configures its jobs.

A data set is named once. Its config is configs/data/<name>.yaml (committed ones, and yours if you
write one) or data/<name>/data.yaml, which `make ingest` and `make download URL_LIST=...` write beside
the data (under the ignored data/ folder, so your tree stays clean); every job takes the name where
it takes a config path (`find_data_config`).

    name: synthetic              # → data/<name>/
    data_root: data              # optional
    url_list: path/to/urls.parquet   # a real URL list; default: data/<name>/urls.parquet (make data)
    folder: path/to/images       # an ingested folder, served on 127.0.0.1 when the list is downloaded
    samples_per_shard: 500       # shared by the source and the download, so splits align with shards
    synthetic: {...}             # make data: keywords of pipelines.synthetic.generate
    download: {...}              # make download: keywords of pipelines.download.download
    embed: {...}                 # make embed: keywords of pipelines.embed.embed (encoder: {model, ...})
    index: {...}                 # make index: keywords of embeddings.index.build_indices
    curate: {...}                # make curate: keywords of pipelines.curate.curate

Every key is checked when the file is loaded; an unknown key, a missing URL list or a missing
column is a ConfigError that names it.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from embeddings import index as index_job
from embeddings import storage, store
from embeddings.config import (
    ConfigError,
    check_keys,
    check_section,
    check_storage_paths,
    dump_yaml,
    load_yaml,
    merge,
    parse_overrides,
)
from embeddings.encoders import EncoderSpec, spec_from_text
from embeddings.layout import DataLayout
from pipelines import curate as curate_job
from pipelines import download as download_job
from pipelines import embed as embed_job
from pipelines import synthetic

CONFIG_DIR = Path("configs/data")  # beside data/, relative to where the jobs run (the checkout)
DEFAULT_DATA = str(CONFIG_DIR / "synthetic.yaml")  # the embedded default, for every job not given a data set
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
    "views_dir",
    "view",
)


@dataclass
class DataConfig:
    """A validated data set config."""

    name: str
    data_root: str = "data"
    url_list: str | None = None
    folder: str | None = None
    samples_per_shard: int = 500
    synthetic: dict[str, Any] | None = None
    download: dict[str, Any] = field(default_factory=dict)
    embed: dict[str, Any] = field(default_factory=dict)
    index: dict[str, Any] = field(default_factory=dict)
    curate: dict[str, Any] = field(default_factory=dict)

    @property
    def layout(self) -> DataLayout:
        return DataLayout.of(self.name, self.data_root)

    @property
    def url_list_path(self) -> Path:
        return storage.as_path(self.url_list) if self.url_list else self.layout.urls


def is_config_path(name_or_path: str | Path) -> bool:
    """True for a config's path, False for a data set's bare name."""
    text = str(name_or_path)
    return "/" in text or text.endswith((".yaml", ".yml"))


def named_config(name: str) -> Path:
    """Where a named data set's written config lives: data/<name>/data.yaml in this checkout, whatever
    its data_root (the config records that), so that the name finds it."""
    return DataLayout.of(name).config


def find_data_config(name_or_path: str | Path) -> Path:
    """A data set's config: a path as given, or for a bare name configs/data/<name>.yaml, else
    data/<name>/data.yaml (written by make ingest and make download URL_LIST=...)."""
    text = str(name_or_path)
    if is_config_path(text):
        return Path(text)
    for path in (CONFIG_DIR / f"{text}.yaml", named_config(text)):
        if path.is_file():
            return path
    raise ConfigError(
        f"no data set named {text!r}: neither {CONFIG_DIR / f'{text}.yaml'} nor {DataLayout.of(text).config} exists "
        "(make ingest FOLDER=... NAME=... or make download URL_LIST=... NAME=... writes the second)"
    )


def new_data_set(name: str, raw: dict, comment: str) -> DataConfig:
    """A data set made by ingest or from a URL list: its config checked (`raw`: DataConfig keys), refused
    where the name is a committed config's (the name would find that one), written to data/<name>/data.yaml."""
    if (CONFIG_DIR / f"{name}.yaml").is_file():
        raise ConfigError(f"the name {name!r} is taken by {CONFIG_DIR / f'{name}.yaml'}: choose another NAME")
    check_keys(raw, [f.name for f in fields(DataConfig)], "the new data set's settings (SET=)")
    for section, fn in (
        ("download", download_job.download),
        ("embed", embed_job.embed),
        ("index", index_job.build_indices),
        ("curate", curate_job.curate),
    ):
        check_section(raw.get(section), fn, f"SET: {section}", exclude=_SET_BY_JOB)
    config = DataConfig(**dict(raw, name=name))
    write_data_config(config, comment)
    return config


def write_data_config(config: DataConfig, comment: str) -> Path:
    """Write data/<name>/data.yaml for `config` (only what differs from the defaults), after a comment."""
    defaults = {
        f.name: f.default if f.default is not MISSING else f.default_factory()
        for f in fields(DataConfig)
        if f.name != "name"
    }
    values = {"name": config.name, **{k: v for k, v in asdict(config).items() if k in defaults and v != defaults[k]}}
    text = "".join(f"# {line}\n" for line in comment.splitlines()) + dump_yaml(values)
    path = named_config(config.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    storage.write_bytes(path, text.encode())
    return path


def load_data_config(path: str | Path, overrides: list[str] | None = None) -> DataConfig:
    """Load and validate a data config (a path or a data set's name); `overrides` are 'key.sub=value' strings."""
    path = find_data_config(path)
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
    check_section(raw.get("curate"), curate_job.curate, f"{path}: curate", exclude=_SET_BY_JOB)
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


def run_download(config: DataConfig, redo: list[str] | None = None) -> dict:
    """`make download`: download this config's URL list into data/<name>/shards/; `redo` names shards
    (00003, ...) to download again, their files removed first."""
    if not config.url_list_path.is_file() and config.synthetic is not None:
        raise ConfigError(f"URL list not found: {config.url_list_path}; run `make data` first")
    if config.folder is not None and not Path(config.folder).is_dir():
        raise ConfigError(f"the ingested folder {config.folder} is gone: its images are served from there")
    download_job.forget_shards(config.layout.shards, redo or [])
    store.forget_shards(config.layout.embeddings, redo or [])  # their embeddings are of the old files
    return download_job.download(
        config.url_list_path,
        config.layout.shards,
        serve_root=config.folder,
        samples_per_shard=config.samples_per_shard,
        summary_path=config.layout.download_summary,
        **config.download,
    )


def run_embed(config: DataConfig, redo: list[str] | None = None, clip: str | None = None) -> dict:
    """`make embed`: embed data/<name>/shards/ into data/<name>/embeddings/; `redo` names shards to embed
    again (their embeddings removed first); `clip` names the CLIP (`encoders.spec_from_text`) in place of
    the config's embed.encoder."""
    options = dict(config.embed)
    if clip:
        options["encoder"] = {**(options.get("encoder") or {}), **spec_from_text(clip)}
    elif "encoder" not in options and (config.layout.embeddings / store.MANIFEST).exists():
        # Neither named: the CLIP these embeddings were made with, not the default one (a rerun, a repair).
        recorded = store.read_manifest(config.layout.embeddings)["encoder"]
        options["encoder"] = {k: recorded[k] for k in ("model", "weights", "pretrained") if recorded.get(k)}
    unknown = [name for name in redo or [] if not (config.layout.shards / f"{name}.tar").exists()]
    if unknown:
        raise ConfigError(f"no shard {unknown[0]} in {config.layout.shards} to embed again")
    store.forget_shards(config.layout.embeddings, redo or [])
    return embed_job.embed(config.layout.shards, config.layout.embeddings, **options)


def reset_embeddings(config: DataConfig) -> list[Path]:
    """Remove the data set's embeddings and the indices built from them (to embed again with another CLIP)."""
    removed = [folder for folder in (config.layout.embeddings, config.layout.index) if folder.exists()]
    for folder in removed:
        storage.remove_tree(folder)
    return removed


def run_index(config: DataConfig) -> dict:
    """`make index`: faiss indices over data/<name>/embeddings/ into data/<name>/index/."""
    return index_job.build_indices(config.layout.embeddings, config.layout.index, **config.index)


def run_curate(config: DataConfig, view: str) -> dict:
    """`make curate`: the view `view` of data/<name>/'s embeddings into data/<name>/views/,
    with its HTML page; returns the summary, the page's path under 'page'."""
    from pipelines.curate_page import write_view_page

    summary = curate_job.curate(config.layout.embeddings, config.layout.views, view, **config.curate)
    return dict(summary, page=str(write_view_page(config.layout, view)))
