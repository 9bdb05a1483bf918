"""A training job's settings: one flat mapping in YAML, split among the callables that take them.

A job's config keys are the keyword parameters of its parts (where it reads and writes, the
LightningModule, the datamodule, the Trainer builder), less those the job sets itself. Each key's
default is the one its part declares, and a key taken by several parts (`seed`, `max_steps`) has its
default in exactly one of them (checked when the job is defined) while its value goes to all. So a
config key is checked and defaulted in one place, and a YAML holds only what differs.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any

from embeddings.config import ConfigError, check_keys, check_storage_paths, load_yaml, merge, parse_overrides

_REQUIRED = inspect.Parameter.empty


@dataclass
class Run:
    """Where a training job reads and writes."""

    data: str  # the data set: a name (configs/data/<name>.yaml, else data/<name>/data.yaml) or a config's path
    data_root: str | None = None  # overrides the data config's data_root
    name: str | None = None  # models/<name>/ and outputs/train-<kind>-<name>/ (default: the data set's name)
    resume: str | None = "auto"  # auto: the run's last.ckpt if any; a path; never (or null): start afresh
    view: str | None = None  # train on the kept keys of data/<name>/views/<view>.parquet (make curate VIEW=...)
    dry_run: bool = False  # print the memory and FLOP estimate, write it to the run folder and stop (reads no data)
    models_root: str = "models"
    outputs_root: str = "outputs"

    def run_folder(self, kind: str, name: str) -> Path:
        """outputs/train-<kind>-<name>/, or outputs/train-<kind>-<name>-view-<view>/ on a view: a run on a view
        never resumes a checkpoint trained on the whole data or on another view (its export is models/<name>/)."""
        return Path(self.outputs_root) / (f"train-{kind}-{name}" + (f"-view-{self.view}" if self.view else ""))

    def data_name(self) -> str:
        """The data set's name from its config alone (a dry run reads nothing the config points to)."""
        from pipelines.data_config import find_data_config

        path = find_data_config(self.data)
        name = load_yaml(path).get("name")
        if not name:
            raise ConfigError(f"{path}: missing key 'name' (the data set's folder under data/)")
        return name

    def layout(self):
        """The data set's folders (embeddings/layout.py), from its config and `data_root`."""
        from pipelines.data_config import load_data_config

        return load_data_config(self.data, [f"data_root={self.data_root}"] if self.data_root else None).layout


@dataclass
class ExportRun(Run):
    """A run whose export folder is named by config: models/<name>/<export>/."""

    export: str | None = None  # default: the job's kind (decoder, upsampler); decoder-text for the baseline


def check_dim(kind: str, sizes: dict, manifest: dict) -> dict:
    """Network sizes with `dim` taken from the embeddings' manifest; a `dim` that disagrees is an error."""
    sizes = dict(sizes)
    if sizes.setdefault("dim", manifest["dim"]) != manifest["dim"]:
        raise ConfigError(f"{kind}.dim {sizes['dim']} disagrees with the embeddings' dim {manifest['dim']}")
    return sizes


def clip_record(manifest: dict) -> dict:
    """How to load and check the CLIP that made the embeddings (model, weights, pretrained, checksum)."""
    return {k: manifest["encoder"].get(k) for k in ("model", "weights", "pretrained", "checksum")}


def _parameters(part: Callable) -> dict[str, inspect.Parameter]:
    kinds = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    target = part.__init__ if inspect.isclass(part) else part
    return {n: p for n, p in inspect.signature(target).parameters.items() if p.kind in kinds and n != "self"}


class JobSpec:
    """The config keys of a job made of `parts` ({role: class or function}), their defaults, and the
    sections (nested mappings such as `prior:` or `sampling:`) checked against a dataclass's fields or a
    tuple of keys."""

    def __init__(self, parts: dict[str, Callable], exclude=(), sections: dict[str, type | tuple] | None = None):
        self.parts = {
            role: {n: p for n, p in _parameters(part).items() if n not in exclude} for role, part in parts.items()
        }
        self.sections = sections or {}
        self.defaults: dict[str, Any] = {}
        owner: dict[str, str] = {}
        for role, params in self.parts.items():
            for name, param in params.items():
                if param.default is _REQUIRED:
                    continue
                if name in owner:
                    raise TypeError(f"{name!r} has a default in both {owner[name]} and {role}: give it one home")
                owner[name], self.defaults[name] = role, param.default
        self.keys = sorted({name for params in self.parts.values() for name in params})
        # A part may name a check per key (`part.config_checks = {key: function}`), run on the value at load time.
        self.checks = {k: f for part in parts.values() for k, f in getattr(part, "config_checks", {}).items()}
        self.required = [k for k in self.keys if k not in self.defaults]

    def resolve(self, settings: dict[str, Any], where: str = "settings") -> dict[str, Any]:
        """Every key checked, every section's keys checked, the required present, defaults filled in."""
        check_keys(settings, self.keys, where)
        for name, kind in self.sections.items():
            if settings.get(name) is not None:
                allowed = [f.name for f in fields(kind)] if is_dataclass(kind) else list(kind)
                check_keys(settings[name], allowed, f"{where}: {name}")
        missing = [k for k in self.required if k not in settings]
        if missing:
            raise ConfigError(f"{where}: missing key {missing[0]!r}")
        check_storage_paths(settings, where)
        resolved = {**self.defaults, **settings}
        for key, check in self.checks.items():
            try:
                check(resolved[key])
            except ConfigError as err:
                raise ConfigError(f"{where}: {err}") from None
        return resolved

    def load(self, path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
        """A job's YAML plus `key=value` overrides, resolved; errors name the file and the key."""
        return self.resolve(merge(load_yaml(path), parse_overrides(overrides)), str(path))

    def split(self, settings: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """The resolved settings as keyword arguments per part."""
        resolved = self.resolve(settings)
        return {role: {k: resolved[k] for k in params} for role, params in self.parts.items()}
