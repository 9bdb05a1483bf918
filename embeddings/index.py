"""faiss indices over embedding shards: choose, build, measure, save, load, search.

    data/<name>/index/image.index, text.index   inner product on unit vectors (= cosine)
    data/<name>/index/ids.parquet               row → key, shard, caption
    data/<name>/index/index.json                factory strings, vector count, recall@10 vs exact search

The index type follows the vector count and a memory budget, as autofaiss chooses: exact search
("Flat") while it is small or fits the budget as float32, HNSW for medium sets that fit, and
IVF + product quantisation (compressed codes) beyond that.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from embeddings import storage, store

KINDS = ("image", "text")


def choose_factory(count: int, dim: int, memory_budget_gb: float = 4.0) -> str:
    """A faiss factory string for `count` vectors of `dim` under a memory budget."""
    flat_bytes = count * dim * 4
    if count <= 100_000 and flat_bytes <= memory_budget_gb * 2**30:
        return "Flat"
    if count <= 5_000_000 and flat_bytes * 1.3 <= memory_budget_gb * 2**30:
        return "HNSW32"
    # IVF with about 4·sqrt(N) lists (at most 2^16), PQ codes sized to the budget.
    lists = int(min(2**16, 2 ** round(math.log2(4 * math.sqrt(count)))))
    m = dim // 4
    while m > 8 and (count * m > memory_budget_gb * 2**30 or dim % m):
        m //= 2
    return f"IVF{lists},PQ{m}x8"


def _use_gpu(index):
    """Move an index to all GPUs when a faiss GPU build and a GPU are present."""
    import faiss

    if hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0:
        return faiss.index_cpu_to_all_gpus(index), True
    return index, False


def build(vectors: np.ndarray, factory: str, nprobe: int = 16):
    """Train and fill a faiss index (inner product) with float32 vectors (N, D)."""
    import faiss

    vectors = np.ascontiguousarray(vectors, np.float32)
    index = faiss.index_factory(vectors.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    index, on_gpu = _use_gpu(index)
    if not index.is_trained:
        sample = vectors[np.random.default_rng(0).permutation(len(vectors))[: 256 * 1024]]
        index.train(sample)
    index.add(vectors)
    if on_gpu:
        index = faiss.index_gpu_to_cpu(index)
    if factory.startswith("IVF"):
        faiss.extract_index_ivf(index).nprobe = nprobe
    return index


def recall_at_k(index, vectors: np.ndarray, k: int = 10, queries: int = 1000, seed: int = 0) -> float:
    """Mean overlap of the index's top-k with exact search's top-k, for sampled stored vectors."""
    import faiss

    vectors = np.ascontiguousarray(vectors, np.float32)
    rows = np.random.default_rng(seed).permutation(len(vectors))[:queries]
    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(vectors)
    k = min(k, len(vectors))
    _, truth = exact.search(vectors[rows], k)
    _, found = index.search(vectors[rows], k)
    return float(np.mean([len(set(t) & set(f)) / k for t, f in zip(truth, found)]))


def build_indices(
    embeddings_dir: str | Path,
    index_dir: str | Path,
    *,
    memory_budget_gb: float = 4.0,
    factory: str | None = None,
    recall_queries: int = 1000,
) -> dict:
    """Build image and text indices over every finished shard; returns what index.json holds."""
    import faiss

    manifest = store.read_manifest(embeddings_dir)
    table = store.read_table(embeddings_dir, columns=["key", "caption", *store.EMBEDDING_COLUMNS], with_shard=True)
    index_dir = storage.as_path(index_dir)
    storage.make_folder(index_dir)
    info = {
        "count": table.num_rows,
        "dim": manifest["dim"],
        "encoder_checksum": manifest["encoder"]["checksum"],
        "indices": {},
    }
    for kind in KINDS:
        vectors = store.arrow_to_vectors(table.column(f"{kind}_embedding"))
        chosen = factory or choose_factory(len(vectors), vectors.shape[1], memory_budget_gb)
        index = build(vectors, chosen)
        with storage.local_target(index_dir / f"{kind}.index") as local:
            faiss.write_index(index, str(local))
        info["indices"][kind] = {
            "factory": chosen,
            "file": f"{kind}.index",
            "recall_at_10": recall_at_k(index, vectors, 10, recall_queries),
        }
    ids = table.select(["key", "shard", "caption"])
    storage.write_parquet(index_dir / "ids.parquet", ids)
    store.write_json(index_dir / "index.json", info)
    return info


class Searcher:
    """A built index folder, loaded for queries: vectors in, (key, caption, score) rows out."""

    def __init__(self, index_dir: str | Path, kind: str = "image"):
        import faiss

        self.index_dir = storage.as_path(index_dir)
        path = self.index_dir / "index.json"
        if not path.is_file():
            raise FileNotFoundError(f"no index in {index_dir}: run `make index` first")
        self.info = json.loads(path.read_text())
        with storage.local_copy(self.index_dir / f"{kind}.index") as local:
            self.index = faiss.read_index(str(local))
        ids = storage.read_parquet(self.index_dir / "ids.parquet")
        self.keys = ids.column("key").to_pylist()
        self.captions = ids.column("caption").to_pylist()
        self.shards = ids.column("shard").to_pylist()

    def search(self, queries: np.ndarray, k: int = 10) -> list[list[dict]]:
        """Top-k rows per query vector (Q, D), best first."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), np.float32)
        if queries.shape[1] != self.info["dim"]:
            raise ValueError(f"query dim {queries.shape[1]} does not match the index dim {self.info['dim']}")
        scores, rows = self.index.search(queries, min(k, len(self.keys)))
        return [
            [
                {
                    "rank": r + 1,
                    "key": self.keys[i],
                    "shard": self.shards[i],
                    "caption": self.captions[i],
                    "score": float(s),
                }
                for r, (i, s) in enumerate(zip(row, score))
                if i >= 0
            ]
            for row, score in zip(rows, scores)
        ]
