"""Where data lives: a local or shared-file-system path, or an object-storage URI (s3://, gs://, az://, ...).

`data_root` may be either; every job reads and writes its files through the functions here, so one
code path serves a laptop, an NFS mount and a bucket. A local path stays a `pathlib.Path`; a URI
becomes a universal_pathlib `UPath` (the same pathlib API over fsspec), so `/`, `.name`, `.stem`,
`.with_suffix`, `.exists()` and `.read_text()` work on both.

Two guarantees hold on both kinds of storage:
- a write is atomic: locally under a temporary name then renamed; on object storage as one PUT (an
  object appears whole or not at all, so a killed job never leaves half a file under the real name);
- a listing is fresh: fsspec's listing cache is off for URIs, because Ray workers on other nodes
  write the same folders the driver lists.

Credentials and endpoints come from the environment as fsspec reads them on every node (for S3:
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL for an S3-compatible store, or an
instance role); the protocol's fsspec package must be installed (s3fs ships with unclip).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def is_uri(path: str | os.PathLike) -> bool:
    """True for 's3://bucket/x' and other fsspec URLs (but not for file:// or a plain path)."""
    text = str(path)
    return "://" in text and not text.startswith("file://")


def as_path(path: str | os.PathLike):
    """A local path as `pathlib.Path`; a URI as an fsspec-backed `UPath` with listings always fresh."""
    if not is_uri(path):
        return Path(str(path).removeprefix("file://"))
    if not isinstance(path, str):  # already a UPath
        return path
    from upath import UPath

    return UPath(path, use_listings_cache=False)


def absolute(path):
    """`as_path`, a local path made absolute: what is handed to Ray workers, whose working folder may differ."""
    path = as_path(path)
    return path if is_uri(path) else path.resolve()


def listing(folder, pattern: str) -> list:
    """Entries of `folder` matching a glob `pattern`, in name order ([] when the folder does not exist)."""
    folder = as_path(folder)
    if not is_uri(folder):
        return sorted(folder.glob(pattern))
    folder.fs.invalidate_cache(folder.path)
    return sorted(folder.glob(pattern), key=lambda p: p.name)


def make_folder(folder) -> None:
    """Create a local folder (object stores have no folders: nothing to do there)."""
    if not is_uri(folder):
        Path(folder).mkdir(parents=True, exist_ok=True)


def remove(path) -> bool:
    """Delete a file where it exists (a path or a URI); True when there was one."""
    path = as_path(path)
    if not path.exists():
        return False
    path.unlink()
    return True


def remove_tree(folder) -> None:
    """Delete a folder and everything under it (a path, or every object under a URI's prefix)."""
    folder = as_path(folder)
    if is_uri(folder):
        folder.fs.rm(folder.path, recursive=True)
    else:
        shutil.rmtree(folder)


def write_bytes(path, data: bytes) -> None:
    """Write bytes atomically: a temporary name renamed into place, or one PUT on object storage."""
    path = as_path(path)
    if is_uri(path):
        path.fs.pipe_file(path.path, data)  # one PUT: the object store publishes it whole or not at all
        return
    with local_target(path) as tmp:
        tmp.write_bytes(data)


def write_parquet(path, table: pa.Table) -> None:
    """Write a Parquet file atomically (through local_target)."""
    with local_target(path) as tmp:
        pq.write_table(table, tmp)


def read_parquet(path, columns: list[str] | None = None, filters=None) -> pa.Table:
    """A Parquet file (some columns, pyarrow filters) from a path or a URI."""
    path = as_path(path)
    if is_uri(path):
        return pq.read_table(path.path, columns=columns, filters=filters, filesystem=path.fs)
    return pq.read_table(path, columns=columns, filters=filters)


def parquet_file(path) -> pq.ParquetFile:
    """An open ParquetFile (schema and row counts without reading the data)."""
    path = as_path(path)
    if is_uri(path):
        return pq.ParquetFile(path.path, filesystem=path.fs)
    return pq.ParquetFile(path)


@contextlib.contextmanager
def open_tar(path) -> Iterator[tarfile.TarFile]:
    """A tar opened for reading from a path or a URI."""
    path = as_path(path)
    if not is_uri(path):
        with tarfile.open(path) as tar:
            yield tar
        return
    with path.open("rb") as f, tarfile.open(fileobj=f) as tar:
        yield tar


@contextlib.contextmanager
def local_copy(path) -> Iterator[Path]:
    """A local file with the content of `path`, for libraries that only read files (faiss)."""
    path = as_path(path)
    if not is_uri(path):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="unclip-") as tmp:
        local = Path(tmp) / path.name
        with path.open("rb") as src, open(local, "wb") as dst:
            shutil.copyfileobj(src, dst)
        yield local


@contextlib.contextmanager
def local_target(path) -> Iterator[Path]:
    """A local file name to write `path` through (for libraries that only write files, like faiss);
    when the block ends without error, the file is renamed into place, or uploaded in one go."""
    path = as_path(path)
    if not is_uri(path):
        tmp = path.with_name(f".{path.name}.tmp")
        yield tmp
        os.replace(tmp, path)
        return
    with tempfile.TemporaryDirectory(prefix="unclip-") as tmp:
        local = Path(tmp) / path.name
        yield local
        path.fs.put_file(str(local), path.path)  # a multipart upload is published only when it completes
