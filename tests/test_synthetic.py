"""The synthetic source: deterministic, splits aligned to shards, held-out pairs kept apart, planned failures."""

from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines import shapes, synthetic


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_output(tmp_path):
    kwargs = dict(n_samples=120, samples_per_shard=20, val_samples=20, heldout_samples=20)
    synthetic.generate(tmp_path / "a", workers=1, **kwargs)
    synthetic.generate(tmp_path / "b", workers=2, **kwargs)
    synthetic.generate(tmp_path / "c", seed=1, **kwargs)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert len(a) > 100 and a == b
    assert _files(tmp_path / "c")["urls.parquet"] != a["urls.parquet"]


def test_splits_never_share_a_shard(tiny_source):
    config, plan = tiny_source
    rows = pq.read_table(config.layout.urls).to_pylist()
    n = config.samples_per_shard
    for start in range(0, len(rows), n):
        assert len({r["split"] for r in rows[start : start + n]}) == 1
    assert plan["splits"] == {"val": 50, "heldout": 50, "train": 200}


def test_heldout_pairs_only_in_the_heldout_split(tiny_source):
    config, _ = tiny_source
    for row in pq.read_table(config.layout.urls).to_pylist():
        pairs = {(row["colour"], row["shape"]), (row["colour_2"], row["shape_2"])} - {(None, None)}
        in_heldout = [p in shapes.HELDOUT_PAIRS for p in pairs]
        assert all(in_heldout) if row["split"] == "heldout" else not any(in_heldout), row


def test_rows_carry_attributes_and_mostly_one_object(tiny_source):
    config, _ = tiny_source
    rows = pq.read_table(config.layout.urls).to_pylist()
    assert {"url", "caption", "split", "sample_id", "shape", "colour", "size", "position", "background"} <= set(rows[0])
    singles = [r for r in rows if r["n_objects"] == 1]
    assert 0.6 < len(singles) / len(rows) < 0.95
    for r in singles:
        named = r[shapes.NAMED_COLUMN].split()
        words = r["caption"].replace(",", " ").replace(":", " ").split()
        assert ("colour" in named) == (r["colour"] in words) and r["shape_2"] is None
        assert ("background" in named) == (r["background"] in words)
    # Captions leave attributes open: some name the background, most do not.
    assert 0.1 < sum("background" in r[shapes.NAMED_COLUMN].split() for r in rows) / len(rows) < 0.5


def test_naming_probabilities_are_config_keys(tmp_path):
    kwargs = dict(n_samples=60, samples_per_shard=20, val_samples=20, heldout_samples=20, workers=1)
    synthetic.generate(tmp_path / "all", naming={k: 1.0 for k in shapes.NAMING}, **kwargs)
    rows = pq.read_table(tmp_path / "all" / "urls.parquet").to_pylist()
    for r in rows:
        scene = shapes.Scene(
            r["background"],
            tuple(
                shapes.ShapeObject(r["shape" + s], r["colour" + s], r["size" + s], r["position" + s])
                for s in ("", "_2")[: r["n_objects"]]
            ),
        )
        assert set(r[shapes.NAMED_COLUMN].split()) == set(
            shapes.choose_named(scene, np.random.default_rng(0), {k: 1.0 for k in shapes.NAMING})
        )
    synthetic.generate(tmp_path / "never", naming={"background": 0.0, "size": 0.0}, **kwargs)
    for r in pq.read_table(tmp_path / "never" / "urls.parquet").to_pylist():
        assert not {"background", "size", "size_2"} & set(r[shapes.NAMED_COLUMN].split())
        assert r["background"] not in r["caption"].split()
    with pytest.raises(ValueError, match="unknown key 'colours'"):
        synthetic.generate(tmp_path / "bad", naming={"colours": 0.5}, **kwargs)
    for bad in (1.5, True):
        with pytest.raises(ValueError, match="probability"):
            synthetic.generate(tmp_path / "bad", naming={"size": bad}, **kwargs)


def test_planned_failures_are_about_two_percent_in_three_kinds(tiny_source):
    config, plan = tiny_source
    assert sorted(set(plan["bad"].values())) == ["404", "html", "truncated"]
    assert len(plan["bad"]) == round(0.02 * plan["n_samples"])
    for sid, kind in plan["bad"].items():
        path = config.layout.source / "images" / f"{sid}.jpg"
        if kind == "404":
            assert not path.exists()
        elif kind == "html":
            assert path.read_bytes().startswith(b"<!doctype html>")
        else:
            with pytest.raises(OSError):
                Image.open(io.BytesIO(path.read_bytes())).load()
    good = next(sid for sid in (f"s{i:07d}" for i in range(10)) if sid not in plan["bad"])
    assert Image.open(config.layout.source / "images" / f"{good}.jpg").size == (64, 64)


def test_default_plan_keeps_enough_val_after_failures():
    splits = synthetic.plan_splits(10_000, 500, 1_500, 500)
    bad = synthetic.plan_bad(10_000, 0.02, seed=0)
    good_val = sum(1 for i, s in enumerate(splits) if s == "val" and i not in bad)
    assert good_val >= 1_100 and splits.count("heldout") == 500


def test_too_few_samples_is_a_clear_error():
    with pytest.raises(ValueError, match="leaves no training samples"):
        synthetic.plan_splits(100, 50, 50, 50)
