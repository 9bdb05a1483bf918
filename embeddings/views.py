"""The view contract: a curated subset of a data set, as a keep-list with a reason per dropped key.

    data/<name>/views/<view>.parquet   key, shard, kept (bool), reason (null where kept), agreement
                                       (caption–image cosine), duplicate_of (the key kept for its group),
                                       similarity (cosine to that key), score_<head> per score head
    data/<name>/views/<view>.json      rows, kept, dropped per reason, the curate settings, and what it was
                                       made against: the manifest's CLIP checksum and every shard's row count

No tar or embedding shard is copied or rewritten. A view is only valid for the embeddings it was made
from: `kept_keys` refuses a view whose CLIP checksum or shard records differ from the manifest's.
"""

from __future__ import annotations

import json

import pyarrow as pa

from embeddings import storage, store
from embeddings.config import ConfigError

REASONS = (  # the order in which they are decided: a row dropped for one is not judged by the next
    "opt_out_key",
    "opt_out_url",
    "opt_out_domain",
    "size",
    "aspect",
    "agreement",
    "score",
    "exact_duplicate",
    "near_duplicate",
)


def view_paths(views_dir, view: str) -> tuple:
    """(<view>.parquet, <view>.json) in a data set's views folder; a view name is a plain file name."""
    if not view or "/" in view or view.startswith("."):
        raise ConfigError(f"view name {view!r}: use a plain name such as 'clean' (it names data/<name>/views/<view>.*)")
    folder = storage.as_path(views_dir)
    return folder / f"{view}.parquet", folder / f"{view}.json"


def made_against(manifest: dict) -> dict:
    """What a view depends on: the CLIP checksum and each shard's row count, from the manifest."""
    return {
        "encoder_checksum": manifest["encoder"]["checksum"],
        "shards": {name: record["rows_written"] for name, record in sorted(manifest["records"].items())},
    }


def write_view(views_dir, view: str, table: pa.Table, summary: dict) -> tuple:
    """Write a view's Parquet, then its JSON (which marks it done); returns the two paths."""
    parquet, summary_path = view_paths(views_dir, view)
    storage.make_folder(storage.as_path(views_dir))
    storage.write_parquet(parquet, table)
    store.write_json(summary_path, summary)
    return parquet, summary_path


def read_summary(views_dir, view: str) -> dict:
    """A view's JSON; a clear error naming the command when there is none."""
    _, summary_path = view_paths(views_dir, view)
    if not summary_path.is_file():
        raise ConfigError(f"no view {view!r} in {views_dir}: run `make curate VIEW={view}` first")
    return json.loads(summary_path.read_text())


def check_view(summary: dict, manifest: dict, view: str) -> None:
    """Refuse a view made against other embeddings (another CLIP) or another set of shards."""
    recorded, current = summary["made_against"], made_against(manifest)
    if recorded["encoder_checksum"] != current["encoder_checksum"]:
        raise ConfigError(
            f"view {view!r} was made from embeddings of another CLIP (checksum {recorded['encoder_checksum'][:12]}…, "
            f"these are {current['encoder_checksum'][:12]}…): run `make curate VIEW={view}` again"
        )
    if recorded["shards"] != current["shards"]:
        changed = sorted(set(recorded["shards"].items()) ^ set(current["shards"].items()))
        raise ConfigError(
            f"view {view!r} was made from another set of shards (first difference: shard {changed[0][0]}): "
            f"run `make curate VIEW={view}` again"
        )


def kept_keys(views_dir, view: str, manifest: dict) -> dict[str, frozenset[str]]:
    """The kept keys of a view per shard name (every shard of the manifest, empty where none is kept),
    after checking the view against the manifest."""
    check_view(read_summary(views_dir, view), manifest, view)
    parquet, _ = view_paths(views_dir, view)
    table = storage.read_parquet(parquet, columns=["key", "shard", "kept"])
    kept: dict[str, set[str]] = {name: set() for name in manifest["records"]}
    for key, shard, keep in zip(*(table.column(c).to_pylist() for c in ("key", "shard", "kept"))):
        if keep:
            kept[shard].add(key)
    return {name: frozenset(keys) for name, keys in kept.items()}
