"""`make download`: an img2dataset-compatible URL list → webdataset shards, with img2dataset on Ray.

Reader → worker → writer → distributor are img2dataset's; this module adds what a training system
needs around them: config checks that name the bad key or column, a local HTTP server for URL lists
whose URLs are relative paths (the synthetic source, `make ingest`), a guard that no shard mixes
splits, and one summary of the per-shard stats (successes, failures by reason, per split) printed at
the end and written to data/<name>/download.json. img2dataset marks a shard done by writing its
NNNNN_stats.json after the tar, so a rerun skips finished shards and redoes a half-written one.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from embeddings import storage
from embeddings.config import ConfigError
from embeddings.store import write_json
from pipelines.cluster import ray_session
from pipelines.server import serve_folder

_FORMATS = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv"}


def read_url_list(path: str | Path, url_col: str = "url", caption_col: str | None = "caption") -> pa.Table:
    """Read a parquet/csv/tsv URL list, checking that the file and the named columns exist."""
    path = storage.as_path(path)
    if not path.is_file():
        raise ConfigError(f"URL list not found: {path}")
    kind = _FORMATS.get(path.suffix)
    if kind is None:
        raise ConfigError(f"URL list {path}: unsupported format {path.suffix!r}; use one of {', '.join(_FORMATS)}")
    if kind == "parquet":
        table = storage.read_parquet(path)
    else:
        options = pacsv.ParseOptions(delimiter="\t" if kind == "tsv" else ",")
        with path.open("rb") as f:
            table = pacsv.read_csv(f, parse_options=options)
    for role, column in (("url_col", url_col), ("caption_col", caption_col)):
        if column is not None and column not in table.column_names:
            raise ConfigError(
                f"URL list {path}: no column {column!r} (set by {role}); columns: {', '.join(table.column_names)}"
            )
    return table


def check_shard_splits(table: pa.Table, samples_per_shard: int) -> None:
    """Raise if a shard of `samples_per_shard` rows would hold rows of two splits."""
    if "split" not in table.column_names:
        return
    splits = table.column("split").to_pylist()
    for start in range(0, len(splits), samples_per_shard):
        present = set(splits[start : start + samples_per_shard])
        if len(present) > 1:
            raise ConfigError(
                f"shard {start // samples_per_shard} (rows {start}-{start + samples_per_shard - 1}) mixes splits "
                f"{sorted(present)}: samples_per_shard must match the URL list's shard size"
            )


def shard_split(shard: int, val_fraction: float) -> str:
    """The split of shard number `shard` in data without a split column: shards 0, k, 2k, ... are val with
    k = round(1 / val_fraction) (at least 2), the rest train. By shard because shards are what trainers
    select and stream; by number, so a shard keeps its split as the data grows."""
    if not 0 < val_fraction < 1:
        raise ConfigError(f"val_fraction {val_fraction}: use a fraction between 0 and 1, e.g. 0.01")
    return "val" if shard % max(2, round(1 / val_fraction)) == 0 else "train"


def shard_splits(rows: int, samples_per_shard: int, val_fraction: float) -> list[str]:
    """A split per row of a URL list without one (`shard_split` of the shard each row lands in)."""
    shards = -(-rows // samples_per_shard)
    if shards < 2:
        raise ConfigError(
            f"the URL list's {rows} rows fill {shards} shard of {samples_per_shard}: a split by shard needs two or "
            "more; lower samples_per_shard or give the list a `split` column (train / val)"
        )
    by_shard = [shard_split(shard, val_fraction) for shard in range(shards)]
    return [by_shard[row // samples_per_shard] for row in range(rows)]


def _is_relative(url: str) -> bool:
    return "://" not in url


def forget_shards(shards_dir, names: list[str]) -> None:
    """Remove downloaded shards `names` (stats first: a shard without them is never trusted), so that
    the next download fetches them again and nothing else."""
    shards_dir = storage.as_path(shards_dir)
    for name in names:
        if not (shards_dir / f"{name}.tar").exists() and not (shards_dir / f"{name}_stats.json").exists():
            raise ConfigError(f"no shard {name} in {shards_dir} to download again")
        for suffix in ("_stats.json", ".tar", ".parquet"):
            storage.remove(shards_dir / f"{name}{suffix}")


def untrusted_stats(shards_dir) -> list[str]:
    """Shards whose `_stats.json` says done but whose tar is missing: their stats are removed, so
    img2dataset fetches them again (a tar without stats it redoes by itself)."""
    shards_dir = storage.as_path(shards_dir)
    tars = {p.stem for p in storage.listing(shards_dir, "*.tar")}
    stale = [p.name.removesuffix("_stats.json") for p in storage.listing(shards_dir, "*_stats.json")]
    stale = [name for name in stale if name not in tars]
    for name in stale:
        storage.remove(shards_dir / f"{name}_stats.json")
        storage.remove(shards_dir / f"{name}.parquet")
    return stale


def summarize(shards_dir) -> dict:
    """Aggregate img2dataset's per-shard parquet and stats into one summary."""
    shards_dir = storage.as_path(shards_dir)
    stats_files = storage.listing(shards_dir, "*_stats.json")
    failures: Counter = Counter()
    by_split: dict[str, Counter] = {}
    count = successes = 0
    for stats_file in stats_files:
        shard = stats_file.name.split("_")[0]
        meta = storage.read_parquet(shards_dir / f"{shard}.parquet").to_pydict()
        split_col = meta.get("split", [None] * len(meta["status"]))
        for status, error, split in zip(meta["status"], meta["error_message"], split_col):
            count += 1
            counter = by_split.setdefault(split or "all", Counter())
            if status == "success":
                successes += 1
                counter["successes"] += 1
            else:
                failures[error or status] += 1
                counter["failures"] += 1
    return {
        "shards": len(stats_files),
        "count": count,
        "successes": successes,
        "failed": count - successes,
        "failures_by_reason": dict(failures.most_common()),
        "by_split": {k: dict(v) for k, v in sorted(by_split.items())},
    }


def download(
    url_list: str | Path,
    output_dir: str | Path,
    *,
    serve_root: str | Path | None = None,
    url_col: str = "url",
    caption_col: str | None = "caption",
    additional_columns: list[str] | None = None,
    image_size: int = 64,
    resize_mode: str = "center_crop",
    samples_per_shard: int = 500,
    thread_count: int = 32,
    timeout: int = 10,
    retries: int = 0,
    encode_quality: int = 95,
    val_fraction: float = 0.01,
    summary_path: str | Path | None = None,
) -> dict:
    """Download `url_list` into webdataset shards under `output_dir`; returns the summary.

    Relative URLs are fetched from a server on 127.0.0.1 over `serve_root` (default: the URL list's
    folder). `additional_columns` (default: every column but url and caption) are kept in each
    sample's json and in the shard parquet, and so is `split`: a list without one gets one by shard
    (`shard_splits`, about `val_fraction` of the shards val). Runs on the Ray named by RAY_ADDRESS, else a local one.
    """
    import img2dataset

    url_list, output_dir = storage.absolute(url_list), storage.absolute(output_dir)
    table = read_url_list(url_list, url_col, caption_col)
    check_shard_splits(table, samples_per_shard)
    if additional_columns is None:
        additional_columns = [c for c in table.column_names if c not in (url_col, caption_col)]
    missing = [c for c in additional_columns if c not in table.column_names]
    if missing:
        raise ConfigError(f"URL list {url_list}: no column {missing[0]!r} (in additional_columns)")
    if "split" not in table.column_names:
        table = table.append_column("split", pa.array(shard_splits(table.num_rows, samples_per_shard, val_fraction)))
    additional_columns = [*additional_columns, *(["split"] if "split" not in additional_columns else [])]

    storage.make_folder(output_dir)
    stale = untrusted_stats(output_dir)
    if stale:
        print(f"[download] {len(stale)} shard(s) had stats but no tar, fetched again: {', '.join(stale)}", flush=True)
    done_before = len(storage.listing(output_dir, "*_stats.json"))
    urls = table.column(url_col).to_pylist()
    needs_server = any(_is_relative(u) for u in urls if u)
    if needs_server and serve_root is None and storage.is_uri(url_list):
        raise ConfigError(f"URL list {url_list} has relative URLs: they are served from a local folder (serve_root)")
    serve_root = Path(serve_root) if serve_root is not None else url_list.parent
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="unclip-download-") as tmp:
        with serve_folder(serve_root) if needs_server else contextlib.nullcontext("") as base_url:
            if needs_server:
                resolved = [base_url + u if u and _is_relative(u) else u for u in urls]
                table = table.set_column(table.column_names.index(url_col), url_col, pa.array(resolved, pa.string()))
            resolved_list = Path(tmp) / "urls.parquet"
            pq.write_table(table, resolved_list)
            with ray_session():
                img2dataset.download(
                    url_list=str(resolved_list),
                    input_format="parquet",
                    url_col=url_col,
                    caption_col=caption_col,
                    save_additional_columns=additional_columns or None,
                    output_folder=str(output_dir),
                    output_format="webdataset",
                    image_size=image_size,
                    resize_mode=resize_mode,
                    skip_reencode=True,
                    encode_quality=encode_quality,
                    number_sample_per_shard=samples_per_shard,
                    thread_count=thread_count,
                    timeout=timeout,
                    retries=retries,
                    distributor="ray",
                    incremental_mode="incremental",
                    enable_wandb=False,
                )
    summary = summarize(output_dir)
    summary["shards_downloaded_this_run"] = summary["shards"] - done_before
    elapsed = time.time() - start
    fetched = summary["shards_downloaded_this_run"] * samples_per_shard
    summary["seconds_this_run"] = round(elapsed, 2)
    summary["urls_per_second_this_run"] = round(min(fetched, summary["count"]) / elapsed, 1) if fetched else 0.0
    write_json(summary_path or output_dir.parent / "download.json", summary)
    return summary


def format_summary(summary: dict) -> str:
    """The summary as a short table for the terminal."""
    lines = [
        f"shards: {summary['shards']} ({summary.get('shards_downloaded_this_run', 0)} downloaded this run)",
        f"samples: {summary['count']}  successes: {summary['successes']}  failed: {summary['failed']}",
    ]
    for reason, n in summary["failures_by_reason"].items():
        lines.append(f"  failed  {n:>7}  {reason}")
    for split, counts in summary["by_split"].items():
        lines.append(
            f"  split {split:<8} successes {counts.get('successes', 0):>7}  failures {counts.get('failures', 0):>5}"
        )
    if summary.get("urls_per_second_this_run"):
        lines.append(f"speed: {summary['urls_per_second_this_run']} URLs/s over {summary['seconds_this_run']} s")
    return "\n".join(lines)
