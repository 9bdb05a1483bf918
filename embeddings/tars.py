"""Reading the download's webdataset shards: samples in tar order, images by key, counts and splits.

A tar holds `key.jpg`, `key.txt` and `key.json` per sample (img2dataset's layout); beside it,
`NNNNN.parquet` lists every row with its status and `NNNNN_stats.json` marks the tar finished.
The shards folder may be a local path or an object-storage URI (embeddings/storage.py).
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

from embeddings import storage

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


class DamagedTar(ValueError):
    """A tar that cannot be read to its end: truncated, a damaged member header, or not a tar at all."""

    def __init__(self, path, reason: str):
        self.path, self.reason = path, reason
        name = storage.as_path(path).stem
        super().__init__(
            f"{path}: {reason} (a damaged tar: `make download REDO={name}` for this data set fetches it again)"
        )


def tar_members(tar_path: str | Path, read: bool = True) -> Iterator[tuple[tarfile.TarInfo, bytes | None]]:
    """(member, its bytes, or None when not `read`) for every file member, in order. A tar that cannot be
    read to its end raises DamagedTar: cut short (in a header or in a member's data), a damaged header
    where tarfile itself would stop early and quietly, no end-of-archive marker, or not a tar at all."""
    try:
        with storage.open_tar(tar_path) as tar:
            for member in tar:
                if member.isfile():
                    yield member, tar.extractfile(member).read() if read else None
            _check_end(tar)
    except (tarfile.TarError, EOFError) as err:
        reason = (str(err).splitlines() or [type(err).__name__])[0]
        if reason.endswith("could not be opened successfully:"):  # every compression tried: not a tar at all
            reason = "not a tar (or an empty file)"
        raise DamagedTar(tar_path, reason) from err


END_OF_ARCHIVE = 1024  # two zero blocks close every tar that was written to its end


def _check_end(tar: tarfile.TarFile) -> None:
    """After the last member come the end-of-archive marker and zero padding, and nothing else."""
    tar.fileobj.seek(tar.offset)
    zeros = 0
    while chunk := tar.fileobj.read(1 << 20):
        if chunk.strip(b"\0"):
            raise tarfile.ReadError(f"unreadable bytes after byte {tar.offset}: a damaged member header")
        zeros += len(chunk)
    if zeros < END_OF_ARCHIVE:
        raise tarfile.ReadError(f"no end-of-archive marker after byte {tar.offset}: the tar was cut short")


def iter_tar_samples(tar_path: str | Path) -> Iterator[dict]:
    """Samples of a tar in order: {'key', 'image' (bytes or None), 'caption', 'meta' (dict)}. A tar that
    cannot be read to its end, or a caption or metadata member that does not decode, raises DamagedTar
    (after yielding the samples before the damage: callers that keep a shard whole drop those)."""
    current: dict | None = None
    for member, data in tar_members(tar_path):
        key, _, ext = member.name.rpartition(".")
        if current is not None and key != current["key"]:
            yield current
            current = None
        if current is None:
            current = {"key": key, "image": None, "caption": "", "meta": {}}
        try:
            if ext in IMAGE_EXTENSIONS:
                current["image"] = data
            elif ext == "txt":
                current["caption"] = data.decode("utf-8")
            elif ext == "json":
                current["meta"] = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise DamagedTar(tar_path, f"member {member.name} does not decode ({type(err).__name__})") from err
    if current is not None:
        yield current


def read_images(shards_dir: str | Path, wanted: dict[str, str]) -> dict[str, bytes]:
    """Image bytes for {key: shard name}, read from <shards_dir>/<shard>.tar by key."""
    by_shard: dict[str, set] = {}
    for key, shard in wanted.items():
        by_shard.setdefault(shard, set()).add(key)
    found: dict[str, bytes] = {}
    for shard, keys in by_shard.items():
        for member, data in tar_members(storage.as_path(shards_dir) / f"{shard}.tar"):
            stem, _, ext = member.name.rpartition(".")
            if stem in keys and ext in IMAGE_EXTENSIONS:
                found[stem] = data
    return found


def finished_tars(shards_dir) -> list:
    """Tars whose `_stats.json` exists (all tars where no stats are written at all), in name order."""
    tars = storage.listing(shards_dir, "*.tar")
    stats = {p.name.removesuffix("_stats.json") for p in storage.listing(shards_dir, "*_stats.json")}
    if not stats:
        return tars
    return [t for t in tars if t.stem in stats]


def tar_info(tar_path: str | Path) -> tuple[int, str | None]:
    """(samples in the tar, its split or None) from img2dataset's shard parquet; counts the tar otherwise."""
    tar_path = storage.as_path(tar_path)
    meta = tar_path.with_suffix(".parquet")
    if meta.is_file():
        names = storage.parquet_file(meta).schema_arrow.names
        table = storage.read_parquet(meta, columns=[c for c in ("status", "split") if c in names])
        status = table.column("status").to_pylist()
        splits = set(table.column("split").to_pylist()) if "split" in table.column_names else {None}
        if len(splits) > 1:
            raise ValueError(f"{tar_path} mixes splits {sorted(map(str, splits))}: trainers select splits per shard")
        return sum(s == "success" for s in status), splits.pop()
    return sum(1 for _ in iter_tar_samples(tar_path)), None
