"""The download job on the shared local Ray: planned successes and failures, resume, other inputs."""

from __future__ import annotations

import csv
import json
import tarfile

import pyarrow.parquet as pq
import pytest

from embeddings.tars import tar_info
from embeddings.config import ConfigError
from pipelines.data_config import load_data_config
from pipelines.download import download
from pipelines.ingest import ingest
from pipelines.server import serve_folder
from pipelines.shapes import Scene, ShapeObject, encode_jpeg, render


def _shard_rows(shards_dir):
    rows = []
    for path in sorted(shards_dir.glob("*.parquet")):
        rows.extend(pq.read_table(path).to_pylist())
    return rows


def test_tiny_download_gives_exactly_the_planned_outcome(tiny_download):
    config, plan, summary = tiny_download
    bad = plan["bad"]
    assert summary["count"] == plan["n_samples"]
    assert summary["successes"] == plan["n_samples"] - len(bad)
    assert summary["shards"] == plan["n_samples"] // config.samples_per_shard
    expected_reason = {"404": "HTTP Error 404", "html": "Image decoding error", "truncated": "Image decoding error"}
    for row in _shard_rows(config.layout.shards):
        if row["sample_id"] in bad:
            assert row["status"] == "failed_to_download" or row["status"] == "failed_to_resize"
            assert expected_reason[bad[row["sample_id"]]] in row["error_message"], row
        else:
            assert row["status"] == "success", row
    reasons = summary["failures_by_reason"]
    assert sum(reasons.values()) == len(bad) and any("404" in r for r in reasons)
    written = json.loads(config.layout.download_summary.read_text())
    assert written["successes"] == summary["successes"]


def test_tars_hold_the_source_bytes_and_metadata(tiny_download):
    config, plan, _ = tiny_download
    source = config.layout.source / "images"
    members = 0
    for tar_path in sorted(config.layout.shards.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            names = tar.getnames()
            keys = {n.rsplit(".", 1)[0] for n in names}
            for key in keys:
                meta = json.load(tar.extractfile(f"{key}.json"))
                image = tar.extractfile(f"{key}.jpg").read()
                assert image == (source / f"{meta['sample_id']}.jpg").read_bytes()
                assert tar.extractfile(f"{key}.txt").read().decode() == meta["caption"]
                assert {"split", "shape", "colour", "position", "background"} <= set(meta)
                members += 1
    assert members == plan["n_samples"] - len(plan["bad"])


def test_rerun_downloads_nothing(tiny_download):
    from pipelines.data_config import run_download

    config, _, first = tiny_download
    tars = {p: p.stat().st_mtime_ns for p in config.layout.shards.glob("*.tar")}
    again = run_download(config)
    assert again["shards_downloaded_this_run"] == 0
    assert {p: p.stat().st_mtime_ns for p in config.layout.shards.glob("*.tar")} == tars
    assert again["successes"] == first["successes"]


def test_csv_url_list_with_absolute_urls(tmp_path, ray_local):
    images = tmp_path / "www"
    images.mkdir()
    for i, colour in enumerate(("red", "blue", "green")):
        scene = Scene("white", (ShapeObject("square", colour, "large", "center"),))
        (images / f"{i}.jpg").write_bytes(encode_jpeg(render(scene, 32)))
    with serve_folder(images) as base:
        with open(tmp_path / "list.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["link", "text", "extra"])
            for i in range(3):
                writer.writerow([f"{base}{i}.jpg", f"caption {i}", f"x{i}"])
            writer.writerow([f"{base}missing.jpg", "gone", "x9"])
        summary = download(
            tmp_path / "list.csv",
            tmp_path / "shards",
            url_col="link",
            caption_col="text",
            image_size=32,
            resize_mode="no",
            samples_per_shard=2,
        )
    assert summary["successes"] == 3 and summary["failed"] == 1
    rows = _shard_rows(tmp_path / "shards")
    assert sorted(r["extra"] for r in rows) == ["x0", "x1", "x2", "x9"]
    # No split column in the list: one by shard, shard 0 val and shard 1 train, in the samples and the stats.
    assert {r["extra"]: r["split"] for r in rows} == {"x0": "val", "x1": "val", "x2": "train", "x9": "train"}
    assert summary["by_split"] == {"train": {"successes": 1, "failures": 1}, "val": {"successes": 2}}
    assert [tar_info(t)[1] for t in sorted((tmp_path / "shards").glob("*.tar"))] == ["val", "train"]


def test_ingest_folder_of_captioned_images(tmp_path, ray_local, monkeypatch):
    """Shards, the split by shard, and the data set's config written to data/<name>/data.yaml; a changed
    folder is refused once shards were made from it."""
    monkeypatch.chdir(tmp_path)  # data/<name>/data.yaml lands under this test's folder
    folder = tmp_path / "photos" / "nested"
    folder.mkdir(parents=True)
    for i in range(4):
        scene = Scene("black", (ShapeObject("circle", "yellow", "small", "top right"),))
        render(scene, 80).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a yellow circle number {i}\n")
    render(Scene("black", ()), 80).save(folder / "uncaptioned.png")
    summary = ingest(tmp_path / "photos", "photos", download={"image_size": 64})
    assert summary["successes"] == 4 and summary["skipped_without_caption"] == 1
    assert summary["shards"] == 4 and summary["by_split"] == {"train": {"successes": 3}, "val": {"successes": 1}}
    rows = sorted(_shard_rows(tmp_path / "data/photos/shards"), key=lambda r: r["caption"])
    assert [r["caption"] for r in rows] == [f"a yellow circle number {i}" for i in range(4)]
    assert all(r["width"] == 64 and r["height"] == 64 for r in rows)  # resized by img2dataset
    config = load_data_config("photos")  # found by its name
    assert config.folder == str((tmp_path / "photos").resolve()) and config.download == {"image_size": 64}
    (folder / "img4.png").write_bytes((folder / "img0.png").read_bytes())
    (folder / "img4.txt").write_text("one more")
    with pytest.raises(ConfigError, match="has changed since data/photos/ was made from it"):
        ingest(tmp_path / "photos", "photos")
    with pytest.raises(ConfigError, match="the name 'tiny' is taken"):
        (tmp_path / "configs" / "data").mkdir(parents=True)
        (tmp_path / "configs" / "data" / "tiny.yaml").write_text("name: tiny\n")
        ingest(tmp_path / "photos", "tiny")


def test_ingest_shards_small_folders_finer_in_an_order_that_spreads_them():
    from pipelines.ingest import shard_size

    assert [shard_size(n) for n in (4, 95, 1_391, 5_000, 40_000)] == [1, 10, 140, 500, 500]


def test_ingest_empty_folder_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(ValueError, match="no image with a caption file"):
        ingest(tmp_path, "x")
