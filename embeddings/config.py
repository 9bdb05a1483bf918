"""YAML configs checked against the typed job functions they feed.

A job is one typed function whose keyword defaults are the truth; its YAML holds only what differs.
`check_section` rejects any key the function does not take, naming it and the keys it does take.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any, Callable

import yaml

from embeddings.storage import is_uri


class ConfigError(ValueError):
    """A config that cannot run: unknown key, wrong type, missing file or column."""


class _Loader(yaml.SafeLoader):
    """YAML's safe loader that also reads exponent numbers without a dot (1e-3, 5E+4) as floats, as YAML 1.2
    and Python do; PyYAML follows YAML 1.1, where they are strings, so `lr: 1e-3` reached AdamW as '1e-3'."""


class _Dumper(yaml.SafeDumper):
    """YAML's safe dumper that quotes the strings _Loader would read as floats ('1e5'), so what is written
    reads back as it was."""


for _kind in (_Loader, _Dumper):
    _kind.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
        list("-+0123456789"),
    )


def parse_yaml(text: str) -> Any:
    """YAML text parsed as configs are (exponent numbers without a dot are floats)."""
    return yaml.load(text, Loader=_Loader)


def dump_yaml(data: Any) -> str:
    """`data` as YAML text that parse_yaml reads back the same, keys in their order."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing file or a non-mapping is a ConfigError naming the path."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = parse_yaml(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values, got {type(data).__name__}")
    return data


def keyword_names(fn: Callable) -> list[str]:
    """The keyword parameters a job function takes."""
    kinds = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in inspect.signature(fn).parameters.values() if p.kind in kinds]


def check_keys(section: dict[str, Any], allowed: list[str], where: str) -> dict[str, Any]:
    """Raise a ConfigError for the first key of `section` not in `allowed`."""
    if not isinstance(section, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(section).__name__}")
    for key in section:
        if key not in allowed:
            raise ConfigError(f"{where}: unknown key {key!r}; known keys: {', '.join(sorted(allowed))}")
    return section


def check_section(section: dict[str, Any] | None, fn: Callable, where: str, exclude=()) -> dict[str, Any]:
    """Keys of `section` checked against the keywords of `fn` (less `exclude`, which the job sets)."""
    allowed = [k for k in keyword_names(fn) if k not in exclude]
    return dict(check_keys(section or {}, allowed, where))


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """['download.thread_count=8', 'name=x'] → nested dict, values parsed as YAML scalars."""
    result: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        dotted, raw = item.split("=", 1)
        node = result
        *parents, leaf = dotted.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = parse_yaml(raw) if raw else None
    return result


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Deep merge: mappings merge key by key, anything else replaces."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


STORAGE_KEYS = ("data_root", "models_root", "outputs_root")


def check_storage_paths(config: dict, where: str) -> None:
    """data_root may be a path or an object-storage URI (s3://, gs://, ...) whose fsspec backend is
    installed; models_root and outputs_root (checkpoints, exports, Lightning logs) must be paths."""
    value = config.get("data_root")
    if isinstance(value, str) and is_uri(value):
        import fsspec

        protocol = value.split("://", 1)[0]
        try:
            fsspec.get_filesystem_class(protocol)
        except (ImportError, ValueError) as err:
            raise ConfigError(f"{where}: data_root {value!r}: no fsspec file system for {protocol}:// ({err})") from err
    for key in STORAGE_KEYS[1:]:
        value = config.get(key)
        if isinstance(value, str) and "://" in value:
            raise ConfigError(
                f"{where}: {key} {value!r} is a URI; checkpoints, exported models and logs need a file-system path "
                "(on a cluster: a shared file system); only data_root may be an object-storage URI"
            )
