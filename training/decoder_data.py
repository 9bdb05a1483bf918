"""The decoder's and upsampler's data: webdataset tars joined with their embedding shards by key.

Each tar `NNNNN.tar` has its embedding shard `NNNNN.parquet` (one Parquet per input shard, the
embed contract). A sample is used when its key has both an image in the tar and a row in the
Parquet; the join is by key, never by position, so a sample the embed job skipped or a row whose
image is gone is dropped, counted and reported, and never shifts its neighbours. The joined samples
of a tar keep tar order, so `ShardStream` splits and resumes them as it does any shard.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from embeddings import storage, store
from embeddings.tars import iter_tar_samples
from training.data import check_val_split, decode_image, empty_view, tar_image_keys, tar_shards
from training.streaming import Shard
from training.trainer import StreamingDataModule

COLUMNS = ["key", "caption", "image_embedding", "text_embedding"]


@dataclass
class JoinReport:
    """What the key join kept and dropped, over all tars of a split."""

    joined: int = 0
    missing_embedding: int = 0  # an image in a tar with no embedding row (skipped by the embed job)
    missing_image: int = 0  # an embedding row whose key has no image in its tar
    missing_shards: list[str] = field(default_factory=list)  # tars with no embedding shard at all

    def __str__(self) -> str:
        text = f"{self.joined} samples joined by key"
        if self.missing_embedding or self.missing_image or self.missing_shards:
            text += (
                f"; dropped {self.missing_embedding} images without an embedding, {self.missing_image} embeddings "
                f"without an image, {len(self.missing_shards)} tars without an embedding shard"
            )
        return text


def joined_shards(
    shards_dir: str | Path, embeddings_dir: str | Path, split: str | None = "train", keep: dict | None = None
) -> tuple[list[Shard], JoinReport]:
    """One Shard per tar of `split` whose count is its joined samples, and the join report. With `keep`
    (training/data.py:view_keys) a tar counts and carries only its kept keys; the report is of the whole join."""
    embeddings_dir = storage.as_path(embeddings_dir)
    done = {store.shard_name(p) for p in store.shard_paths(embeddings_dir)}
    shards, report = [], JoinReport()
    for tar in tar_shards(shards_dir, split):
        name = store.shard_name(tar.path)
        image_keys = tar_image_keys(tar.path)
        if name not in done:
            report.missing_shards.append(name)
            report.missing_embedding += len(image_keys)
            continue
        embedded = set(store.read_shard(embeddings_dir / f"{name}.parquet", columns=["key"]).column("key").to_pylist())
        joined = sum(k in embedded for k in image_keys)
        report.joined += joined
        report.missing_embedding += len(image_keys) - joined
        report.missing_image += len(embedded - set(image_keys))
        kept = None if keep is None else keep.get(name, frozenset())
        count = joined if kept is None else sum(k in embedded and k in kept for k in image_keys)
        if count:
            shards.append(Shard(tar.path, count, kept))
    if not shards and keep is not None:
        raise empty_view(split, shards_dir)
    if not shards:
        raise FileNotFoundError(
            f"no {split or ''} samples join {shards_dir} with {embeddings_dir}: run `make embed` first"
        )
    return shards, report


def square_image(data: bytes, size: int) -> np.ndarray:
    """Image bytes → (size, size, 3) uint8: centre-cropped to a square, then resized (box filter when shrinking)."""
    image = decode_image(data)
    w, h = image.size
    if w != h:
        side = min(w, h)
        image = image.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
    if image.size[0] != size:
        image = image.resize((size, size), Image.BOX if image.size[0] > size else Image.BICUBIC)
    return np.asarray(image, dtype=np.uint8)


def to_image_batch(rows: list[dict]) -> dict:
    """Joined rows → images (B, 3, H, W) in [-1, 1], z_i and z_t (B, D) (unit, or raw where the rows were read
    raw), keys and captions."""
    images = torch.from_numpy(np.stack([r["image"] for r in rows])).permute(0, 3, 1, 2).float() / 127.5 - 1
    return {
        "image": images,
        "z_i": torch.from_numpy(np.stack([r["image_embedding"] for r in rows])),
        "z_t": torch.from_numpy(np.stack([r["text_embedding"] for r in rows])),
        "key": [r["key"] for r in rows],
        "caption": [r["caption"] for r in rows],
    }


class ImageEmbeddingDataModule(StreamingDataModule):
    """Train: the train split's joined samples (a view's kept keys with `keep`), streamed. Val: the first
    `val_samples` joined val samples, whatever the view.
    With `raw_norms` (a decoder in Karlo's layout) z_i and z_t are the raw CLIP vectors, unit × the norm columns
    (shards without them are refused)."""

    collate_fn = staticmethod(to_image_batch)

    def __init__(
        self,
        shards_dir: str,
        embeddings_dir: str,
        *,
        image_size: int,
        seed: int,
        batch_size: int = 64,
        num_workers: int = 0,
        shuffle_buffer: int = 2048,
        val_samples: int = 256,
        val_split: str = "val",
        raw_norms: bool = False,
        keep: dict | None = None,
    ):
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed, shuffle_buffer=shuffle_buffer)
        check_val_split(val_split)
        self.raw_norms, self.keep = raw_norms, keep
        self.shards_dir, self.embeddings_dir, self.image_size = shards_dir, storage.as_path(embeddings_dir), image_size
        self.val_samples, self.val_split = val_samples, val_split
        self.reports: dict[str, JoinReport] = {}
        self._shards: dict[str, list[Shard]] = {}

    def shards(self, split: str) -> list[Shard]:
        """The joined shards of a split (computed once); prints the join report."""
        if split not in self._shards:
            keep = self.keep if split == "train" else None
            self._shards[split], self.reports[split] = joined_shards(self.shards_dir, self.embeddings_dir, split, keep)
            print(f"{split}: {self.reports[split]}")
        return self._shards[split]

    def read(self, shard: Shard, start: int, stop: int) -> Iterator[dict]:
        """Joined samples start..stop-1 of a tar: its embedding row by key, the image decoded and squared."""
        path = self.embeddings_dir / f"{store.shard_name(shard.path)}.parquet"
        columns = COLUMNS + list(store.NORM_COLUMNS.values()) if self.raw_norms else COLUMNS
        table = store.read_shard(path, columns=columns)
        row_of = {k: i for i, k in enumerate(table.column("key").to_pylist())}
        vectors = {
            c: store.raw_vectors(table, c, str(path)) if self.raw_norms else store.arrow_to_vectors(table.column(c))
            for c in store.EMBEDDING_COLUMNS
        }
        captions = table.column("caption").to_pylist()
        position = 0
        for sample in iter_tar_samples(shard.path):
            if sample["image"] is None or sample["key"] not in row_of or not shard.keeps(sample["key"]):
                continue
            if position >= stop:
                return
            if position >= start:
                i = row_of[sample["key"]]
                yield {
                    "key": sample["key"],
                    "caption": captions[i],
                    "image": square_image(sample["image"], self.image_size),
                    "image_embedding": vectors["image_embedding"][i],
                    "text_embedding": vectors["text_embedding"][i],
                }
            position += 1

    def train_shards(self) -> list[Shard]:
        return self.shards("train")

    def val_rows(self) -> list[dict]:
        rows = []
        for shard in self.shards(self.val_split):
            rows += list(self.read(shard, 0, min(shard.count, self.val_samples - len(rows))))
            if len(rows) >= self.val_samples:
                break
        return rows

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_rows(), batch_size=self.batch_size, collate_fn=to_image_batch)
