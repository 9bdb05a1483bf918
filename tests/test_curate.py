"""make curate: every filter's reason, duplicate groups found within clusters, the view contract, and trainers on a view."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embeddings import store, views
from embeddings.config import ConfigError
from pipelines.curate import UnionFind, curate, domain_of

from .conftest import opt_out_view

DIM = 16


def _embeddings(folder, rows: list[dict], shard_rows: int = 20) -> None:
    """Unit image/text vectors and metadata rows written as embedding shards with records and a manifest."""
    records = {}
    for s, start in enumerate(range(0, len(rows), shard_rows)):
        part = rows[start : start + shard_rows]
        table = pa.table(
            {
                "key": [r["key"] for r in part],
                "caption": [f"caption of {r['key']}" for r in part],
                "image_embedding": store.vectors_to_arrow(np.stack([r["image"] for r in part]), "float32"),
                "text_embedding": store.vectors_to_arrow(np.stack([r["text"] for r in part]), "float32"),
                "split": ["train"] * len(part),
                **{c: [r[c] for r in part] for c in ("url", "sha256", "original_width", "original_height")},
            }
        )
        name = f"{s:05d}"
        records[name] = {"rows_written": len(part), "skipped": {}}
        store.write_shard(folder, name, table, records[name])
    encoder = {"model": "test", "checksum": "c" * 64, "dim": DIM}
    store.write_manifest(folder, encoder, "float32", records)


def _unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


@pytest.fixture
def planted(tmp_path):
    """60 distinct rows; planted: near copies of rows 0-4 (two of row 0), a byte-identical copy of row 5, and
    one row for each other reason."""
    rng = np.random.default_rng(0)
    base = _unit(rng.normal(size=(60, DIM)))
    rows = []
    for i, v in enumerate(base):
        text = _unit(v + 0.3 * rng.normal(size=DIM))
        rows.append(
            {
                "key": f"{i:04d}",
                "image": v,
                "text": text,
                "url": f"http://site{i % 3}.example/img{i}.jpg",
                "sha256": f"hash{i}",
                "original_width": 256,
                "original_height": 256,
            }
        )
    copies = [(0, "0100"), (0, "0101"), (1, "0102"), (2, "0103"), (3, "0104"), (4, "0105")]
    for source, key in copies:
        near = _unit(base[source] + 0.01 * rng.normal(size=DIM))
        rows.append(dict(rows[source], key=key, image=near, sha256=f"hash{key}", url=f"http://m.example/{key}.jpg"))
    rows.append(dict(rows[5], key="0106", url="http://m.example/0106.jpg"))  # the same bytes as row 5
    rows[10]["original_width"] = 40  # too small
    rows[11]["original_width"] = 1024  # 4:1
    rows[12]["text"] = _unit(-base[12])  # a caption that disagrees with its image
    rows[13]["url"] = "http://www.blocked.example/x.jpg"
    rows[14]["url"] = "http://ok.example/optout.jpg"
    head = np.zeros(DIM + 1, np.float32)
    head[:DIM] = base[15]  # scores row 15 at 1, the rest near 0
    emb = tmp_path / "embeddings"
    _embeddings(emb, rows)
    np.save(tmp_path / "head.npy", head)
    (tmp_path / "keys.txt").write_text("# keys to drop\n0016\n")
    (tmp_path / "urls.txt").write_text("http://ok.example/optout.jpg\n")
    (tmp_path / "domains.txt").write_text("blocked.example\n")
    settings = {
        "near_duplicate": 0.98,
        "min_agreement": 0.0,
        "min_size": 64,
        "max_aspect": 3.0,
        "opt_out_keys": str(tmp_path / "keys.txt"),
        "opt_out_urls": str(tmp_path / "urls.txt"),
        "opt_out_domains": str(tmp_path / "domains.txt"),
        "score_heads": {"unwanted": {"weights": str(tmp_path / "head.npy"), "max": 0.9}},
    }
    return tmp_path, rows, settings


def test_every_reason_is_recorded_and_each_duplicate_group_keeps_its_best_row(planted):
    root, rows, settings = planted
    summary = curate(root / "embeddings", root / "views", "clean", **settings)
    table = pq.read_table(root / "views" / "clean.parquet").to_pylist()
    reason = {r["key"]: r["reason"] for r in table}
    assert reason["0016"] == "opt_out_key" and reason["0014"] == "opt_out_url" and reason["0013"] == "opt_out_domain"
    assert reason["0010"] == "size" and reason["0011"] == "aspect" and reason["0012"] == "agreement"
    assert reason["0015"] == "score" and reason["0106"] == "exact_duplicate"
    agreement = {r["key"]: float(r["image"] @ r["text"]) for r in rows}
    families = {0: ["0000", "0100", "0101"], 1: ["0001", "0102"], 2: ["0002", "0103"], 3: ["0003", "0104"]}
    families |= {4: ["0004", "0105"], 5: ["0005", "0106"]}
    for members in families.values():
        kept = [k for k in members if reason[k] is None]
        assert kept == [max(members, key=lambda k: (agreement[k], -int(k)))]  # the best caption–image agreement
        assert all(reason[k] in ("near_duplicate", "exact_duplicate") for k in members if k not in kept)
    planted_keys = {k for members in families.values() for k in members}
    assert {k for k, why in reason.items() if why and why.endswith("duplicate")} <= planted_keys  # precision 1
    assert summary["rows"] == len(rows) == summary["kept"] + sum(summary["dropped"].values())
    assert summary["dropped"] == {
        "opt_out_key": 1,
        "opt_out_url": 1,
        "opt_out_domain": 1,
        "size": 1,
        "aspect": 1,
        "agreement": 1,
        "score": 1,
        "exact_duplicate": 1,
        "near_duplicate": 6,
    }
    scores = {r["key"]: r["score_unwanted"] for r in table}
    assert scores["0015"] == pytest.approx(1.0, abs=1e-5) and abs(scores["0020"]) < 0.9
    assert summary["made_against"]["encoder_checksum"] == "c" * 64
    first = (root / "views" / "clean.parquet").read_bytes(), (root / "views" / "clean.json").read_bytes()
    curate(root / "embeddings", root / "views", "clean", **settings)  # a rerun: the same files
    assert ((root / "views" / "clean.parquet").read_bytes(), (root / "views" / "clean.json").read_bytes()) == first


def test_a_quantile_cut_and_no_filters(planted):
    root, rows, _ = planted
    summary = curate(root / "embeddings", root / "views", "q", near_duplicate=None, agreement_quantile=0.25)
    agreement = np.array([r["image"] @ r["text"] for r in rows])
    below = int((agreement < np.quantile(agreement, 0.25)).sum())
    assert summary["dropped"]["agreement"] == below and 0.2 * len(rows) < below < 0.3 * len(rows)
    everything = curate(root / "embeddings", root / "views", "all", near_duplicate=None)
    assert everything["kept"] == len(rows) - 1 and everything["dropped"] == {"exact_duplicate": 1}


def test_a_view_of_other_embeddings_or_shards_is_refused(planted):
    root, _, settings = planted
    summary = curate(root / "embeddings", root / "views", "clean", **settings)
    manifest = store.read_manifest(root / "embeddings")
    assert sum(map(len, views.kept_keys(root / "views", "clean", manifest).values())) == summary["kept"] == 53
    other = dict(manifest, encoder=dict(manifest["encoder"], checksum="d" * 64))
    with pytest.raises(ConfigError, match="another CLIP"):
        views.kept_keys(root / "views", "clean", other)
    fewer = dict(manifest, records={k: v for k, v in manifest["records"].items() if k != "00001"})
    with pytest.raises(ConfigError, match="another set of shards"):
        views.kept_keys(root / "views", "clean", fewer)
    with pytest.raises(ConfigError, match="make curate VIEW=nope"):
        views.kept_keys(root / "views", "nope", manifest)
    with pytest.raises(ConfigError, match="plain name"):
        views.view_paths(root / "views", "../x")


def test_the_prior_streams_every_kept_key_once_per_epoch_on_one_and_two_ranks(planted, monkeypatch):
    from training.prior import PriorDataModule

    root, _, settings = planted
    curate(root / "embeddings", root / "views", "clean", **settings)
    keep = views.kept_keys(root / "views", "clean", store.read_manifest(root / "embeddings"))
    kept = set().union(*keep.values())
    for world in (1, 2):
        seen = []
        for rank in range(world):
            monkeypatch.setenv("RANK", str(rank))
            monkeypatch.setenv("WORLD_SIZE", str(world))
            module = PriorDataModule(str(root / "embeddings"), seed=0, batch_size=1, shuffle_buffer=8, keep=keep)
            seen += [row["key"] for row in module.train_stream(epoch=0)]
        assert len(seen) == len(set(seen)) and set(seen) <= kept  # never a dropped key, never twice
        assert len(seen) >= len(kept) - world + 1  # all of them (a rank's equal share drops at most world - 1)
        unfiltered = PriorDataModule(str(root / "embeddings"), seed=0, batch_size=1, shuffle_buffer=8)
        assert sum(s.count for s in unfiltered.train_shards()) == 67


def test_union_find_and_domains():
    groups = UnionFind(6)
    groups.union(0, 1)
    groups.union(4, 1)
    groups.union(2, 3)
    assert sorted(map(sorted, groups.groups().values())) == [[0, 1, 4], [2, 3]]
    assert domain_of("https://WWW.Example.com:8080/a?b") == "example.com" and domain_of(None) == ""


def test_the_decoder_and_clip_streams_read_only_a_views_kept_keys(tiny_embed, tmp_path):
    """The tars joined with their embeddings (decoder, upsampler) and the tars alone (CLIP) on a view: the kept
    train keys, each once per epoch."""
    from training.data import read_tar_range, tar_shards, view_keys
    from training.decoder_data import ImageEmbeddingDataModule

    config, _ = tiny_embed
    layout = config.layout
    train = store.read_table(layout.embeddings, ["key", "split"]).to_pylist()
    train_keys = [r["key"] for r in train if r["split"] == "train"]
    opt_out_view(layout, "some", train_keys[::4], tmp_path)
    keep = view_keys(layout, "some")
    kept = set(train_keys) & set().union(*keep.values())
    assert kept == set(train_keys) - set(train_keys[::4])
    decoder = ImageEmbeddingDataModule(str(layout.shards), str(layout.embeddings), image_size=8, seed=0, batch_size=1)
    decoder.keep = keep
    shards = decoder.shards("train")
    assert sum(s.count for s in shards) == len(kept)
    seen = [row["key"] for row in decoder.train_stream(epoch=0)]
    assert sorted(seen) == sorted(kept)
    clip_shards = tar_shards(layout.shards, "train", keep)
    seen = [s["key"] for shard in clip_shards for s in read_tar_range(shard, 0, shard.count)]
    assert sorted(seen) == sorted(kept) and sum(s.count for s in clip_shards) == len(kept)


def test_the_clustered_search_finds_what_all_pairs_finds_and_never_more():
    """near_pairs on 5 000 rows (k-means clusters): with every cluster searched it equals exact all-pairs
    search; with 2 of 8 it finds a subset of those pairs and most of them."""
    from pipelines.curate import near_pairs

    rng = np.random.default_rng(1)
    vectors = _unit(rng.normal(size=(5000, DIM)))
    sources = rng.choice(4800, 200, replace=False)
    vectors[4800:] = _unit(vectors[sources] + 0.02 * rng.normal(size=(200, DIM)))
    rows = np.arange(len(vectors))
    scores = vectors @ vectors.T
    exact = {(int(i), int(j)) for i, j in zip(*np.nonzero(scores >= 0.95)) if i < j}
    assert len(exact) >= 200
    every = {tuple(p) for p in near_pairs(vectors, rows, 0.95, breadth=8, clusters=8).tolist()}
    assert every == exact
    some = {tuple(p) for p in near_pairs(vectors, rows, 0.95, breadth=2, clusters=8).tolist()}
    assert some <= exact and len(some) >= 0.8 * len(exact)
    subset = rows[::2]  # pairs among given rows only, as row numbers of the whole table
    within = {tuple(p) for p in near_pairs(vectors, subset, 0.95, breadth=8, clusters=8).tolist()}
    assert within == {(i, j) for i, j in exact if i % 2 == 0 and j % 2 == 0}


def test_the_search_as_ray_tasks_finds_the_same_pairs(ray_local, capsys):
    """search_on_ray (the clusters dealt into Ray tasks, each sent its clusters' rows only) finds exactly the
    pairs the in-process search finds, with more clusters than tasks and tasks of several clusters."""
    from pipelines.curate import near_pairs

    rng = np.random.default_rng(2)
    vectors = _unit(rng.normal(size=(3000, DIM)))
    sources = rng.choice(2900, 100, replace=False)
    vectors[2900:] = _unit(vectors[sources] + 0.02 * rng.normal(size=(100, DIM)))
    rows = np.arange(0, len(vectors), 1)
    local = near_pairs(vectors, rows, 0.95, breadth=2, clusters=12)
    on_ray = near_pairs(vectors, rows, 0.95, breadth=2, clusters=12, ray_tasks=5)
    assert len(local) >= 80
    np.testing.assert_array_equal(on_ray, local)
    assert "12 clusters in 5 Ray tasks" in capsys.readouterr().out
