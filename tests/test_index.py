"""Indices, nearest-neighbour inspection, and the clip-retrieval layout both ways."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from embeddings import store
from embeddings.index import Searcher, build_indices, choose_factory
from embeddings.knn import knn
from pipelines.clip_retrieval import export_clip_retrieval, import_clip_retrieval


@pytest.fixture(scope="module")
def tiny_index(tiny_embed):
    config, _ = tiny_embed
    return config, build_indices(config.layout.embeddings, config.layout.index)


def test_index_json_and_own_key_first(tiny_index):
    config, info = tiny_index
    table = store.read_table(config.layout.embeddings, columns=["key", "image_embedding", "text_embedding"])
    assert info["count"] == table.num_rows
    for kind in ("image", "text"):
        assert info["indices"][kind]["factory"] == "Flat"
        vectors = store.arrow_to_vectors(table.column(f"{kind}_embedding"))
        searcher = Searcher(config.layout.index, kind)
        keys = table.column("key").to_pylist()
        for row in (0, 17, len(keys) - 1):
            # first, or tied for first: rows with the same caption have the same text embedding
            hits = searcher.search(vectors[row], k=5)[0]
            assert keys[row] in [h["key"] for h in hits if h["score"] >= hits[0]["score"] - 1e-6]


def test_factory_follows_count_and_budget():
    assert choose_factory(10_000, 512) == "Flat"
    assert choose_factory(1_000_000, 512, memory_budget_gb=4) == "HNSW32"
    big = choose_factory(400_000_000, 768, memory_budget_gb=64)
    assert big.startswith("IVF") and ",PQ" in big


def numpy_recall_at_10(index_dir, keys: list[str], vectors: np.ndarray, queries: int) -> float:
    """recall@10 of the saved image index against exact search in numpy, over the queries recall_at_k samples."""
    rows = np.random.default_rng(0).permutation(len(vectors))[:queries]
    exact = [{keys[j] for j in top} for top in np.argsort(-(vectors[rows] @ vectors.T), axis=1)[:, :10]]
    found = [{hit["key"] for hit in hits} for hits in Searcher(index_dir, "image").search(vectors[rows], 10)]
    return float(np.mean([len(e & f) / 10 for e, f in zip(exact, found)]))


def test_recorded_recall_is_what_the_saved_index_finds(tiny_embed, tmp_path):
    """index.json's recall@10 equals a recount against numpy's exact search: 1 for Flat, lower for a
    coarse IVF-PQ, so the figure can tell a good index from a bad one."""
    config, _ = tiny_embed
    table = store.read_table(config.layout.embeddings, ["key", "image_embedding"])
    keys, vectors = table.column("key").to_pylist(), store.arrow_to_vectors(table.column("image_embedding"))
    recalls = {}
    for factory in ("Flat", "IVF4,PQ4x4"):
        info = build_indices(config.layout.embeddings, tmp_path / factory, factory=factory, recall_queries=100)
        recorded = info["indices"]["image"]["recall_at_10"]
        assert recorded == pytest.approx(numpy_recall_at_10(tmp_path / factory, keys, vectors, 100), abs=0.02)
        recalls[factory] = recorded
    assert recalls["Flat"] == pytest.approx(1.0, abs=0.02) and recalls["IVF4,PQ4x4"] < 0.9


def test_knn_by_key_and_by_text_writes_a_page(tiny_index, tmp_path):
    config, _ = tiny_index
    key = store.read_table(config.layout.embeddings, columns=["key"]).column("key")[3].as_py()
    rows, page = knn(config.layout, key=key, k=5, out_dir=tmp_path)
    assert rows[0]["key"] == key and len(rows) == 5 and rows[0]["score"] >= rows[-1]["score"]
    html = page.read_text()
    assert html.count("data:image/png;base64,") == 6  # five neighbours and the query
    rows, page = knn(config.layout, query="a large red circle in the center", k=3, kind="text", out_dir=tmp_path)
    assert len(rows) == 3 and page.exists() and "a large red circle" in page.read_text()
    with pytest.raises(ValueError, match="exactly one"):
        knn(config.layout, query="x", key=key, out_dir=tmp_path)


def test_clip_retrieval_export_reads_back_with_embedding_reader_and_faiss(tiny_embed, tmp_path):
    import faiss
    from embedding_reader import EmbeddingReader

    config, manifest = tiny_embed
    out = tmp_path / "cr"
    counts = export_clip_retrieval(config.layout.embeddings, out)
    reference = store.read_table(config.layout.embeddings, columns=["key", "image_embedding"])
    ref = dict(zip(reference.column("key").to_pylist(), store.arrow_to_vectors(reference.column("image_embedding"))))
    reader = EmbeddingReader(
        str(out / "img_emb"),
        file_format="parquet_npy",
        metadata_folder=str(out / "metadata"),
        meta_columns=["key", "caption"],
    )
    assert reader.count == counts["rows"] == manifest["rows"]
    got = {}
    for vectors, meta in reader(batch_size=10_000, start=0, end=reader.count, show_progress=False):
        got.update(zip(meta["key"], vectors))
    assert got.keys() == ref.keys() and all(np.allclose(got[k], ref[k], atol=1e-3) for k in ref)
    keys = list(got)
    matrix = np.stack([got[k] for k in keys]).astype(np.float32)
    index = faiss.IndexFlatIP(matrix.shape[1])
    index.add(matrix)
    assert keys[int(index.search(matrix[5:6], 1)[1][0, 0])] == keys[5]


def test_clip_retrieval_import_round_trips(tiny_embed, tmp_path):
    config, manifest = tiny_embed
    export_clip_retrieval(config.layout.embeddings, tmp_path / "cr")
    imported = import_clip_retrieval(tmp_path / "cr", tmp_path / "emb", encoder=manifest["encoder"])
    assert imported["rows"] == manifest["rows"] and imported["encoder"]["checksum"] == manifest["encoder"]["checksum"]
    a = store.read_table(config.layout.embeddings).sort_by("key")
    b = store.read_table(tmp_path / "emb").sort_by("key")
    assert a.column("key").equals(b.column("key")) and a.column("caption").equals(b.column("caption"))
    assert np.allclose(
        store.arrow_to_vectors(a.column("text_embedding")),
        store.arrow_to_vectors(b.column("text_embedding")),
        atol=2e-3,
    )
    assert a.column("split").equals(b.column("split"))
    for path in (tmp_path / "cr" / "metadata").glob("*.parquet"):
        pq.write_table(pq.read_table(path).drop_columns(["key", "split"]), path)
    with pytest.warns(UserWarning, match="no key column"):
        positional = import_clip_retrieval(tmp_path / "cr", tmp_path / "emb2")
    assert positional["rows"] == manifest["rows"] and positional["encoder"]["checksum"].startswith("unknown")
    # Metadata without a split (LAION's): split by part number, part 0 val, as a URL list by shard.
    splits = {
        store.shard_name(p): set(pq.read_table(p, columns=["split"]).column(0).to_pylist())
        for p in store.shard_paths(tmp_path / "emb2")
    }
    assert len(splits) > 2 and splits.pop("00000") == {"val"} and all(s == {"train"} for s in splits.values())
