"""Your own data by name, through the real make targets, and damaged shards that never stop a job.

The make targets run as subprocesses in a sandbox: a temporary folder with this checkout's Makefile,
configs, environment and committed CLIP linked in, so that data/, models/ and outputs/ are the test's.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from embeddings import store
from embeddings.config import ConfigError
from embeddings.tars import DamagedTar, iter_tar_samples
from pipelines.shapes import BACKGROUNDS, COLOURS, SHAPES, Scene, ShapeObject, caption, render

from .conftest import REPO, kill_session

STAMP = ".venv/.installed-faiss-cpu"  # never remade from a sandbox (make's -o)
# Added to each training line of the README block so that it runs in a minute.
TINY = {
    "train-clip": "CLIP_CONFIG=configs/clip/tiny.yaml",
    # A CLIP trained for a minute cannot tell these images apart: no near-duplicate search (the planted test has one).
    "curate": "SET=curate.near_duplicate=null",
    "train-prior": "PRIOR_CONFIG=configs/prior/tiny.yaml",
    "train-decoder": "DECODER_CONFIG=configs/decoder/tiny.yaml",
    "train-upsampler": "UPSAMPLER_CONFIG=configs/decoder/upsampler-tiny.yaml",
    "sample": "STEPS=2",
}


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    root = tmp_path_factory.mktemp("sandbox")
    for name in ("Makefile", "pyproject.toml", "requirements.lock", ".venv", "configs"):
        (root / name).symlink_to(REPO / name)
    (root / "models").mkdir()
    (root / "models" / "synthetic").symlink_to(REPO / "models" / "synthetic")
    return root


def user_vars() -> set[str]:
    """The Makefile's USER_VARS: none of them may come from this process's environment."""
    text = (REPO / "Makefile").read_text().replace("\\\n", " ")
    return set(re.search(r"^USER_VARS := (.*)$", text, re.M).group(1).split())


def make(sandbox, *args: str, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """A make command in the sandbox, in a session of its own (its Ray included), cleaned up after."""
    drop = {"MAKEFLAGS", "MFLAGS", "MAKELEVEL", "RAY_ADDRESS"} | user_vars()
    env = {**{k: v for k, v in os.environ.items() if k not in drop}, **(env or {})}
    command = ["make", "--no-print-directory", "-o", STAMP, *args]
    process = subprocess.Popen(
        command, cwd=sandbox, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = process.communicate(timeout=timeout)
    finally:
        kill_session(process.pid)
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def captioned_folder(root, n: int = 48):
    """Images in nested folders with captions beside them: one PNG with alpha, a caption in Unicode, one
    image without a caption (skipped and counted)."""
    rng = np.random.default_rng(0)
    for i in range(n):
        obj = ShapeObject(SHAPES[i % len(SHAPES)], list(COLOURS)[(i // 2) % len(COLOURS)], "large", "center")
        scene = Scene(list(BACKGROUNDS)[i % 2], (obj,))
        folder = root / f"set{i % 3}" / ("deeper" if i % 4 == 0 else "")
        folder.mkdir(parents=True, exist_ok=True)
        image = render(scene, 48 + int(rng.integers(0, 32)))
        if i == 0:
            image = image.convert("RGBA")
            image.putalpha(200)
        image.save(folder / f"img{i:03d}.png" if i % 5 == 0 else folder / f"img{i:03d}.jpg")
        text = caption(scene) + (" — ünïcode ✓" if i == 1 else "")
        (folder / f"img{i:03d}.txt").write_text(text + "\n", encoding="utf-8")
    Image.new("RGB", (40, 40)).save(root / "set0" / "no-caption.jpg")
    return root


def readme_block() -> list[str]:
    """The make lines of the README's own-data block, as a user would paste them."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Your own data") :]
    block = section[section.index("```bash") + len("```bash") : section.index("```", section.index("```bash") + 7)]
    return [line.split("  #")[0].strip() for line in block.strip().splitlines() if line.strip()]


def test_the_readme_own_data_block_runs_as_written(sandbox, tmp_path):
    """A captioned folder through every stage by its name alone: ingest, a CLIP trained on it, embeddings
    with that CLIP, index, knn, prior, decoder, upsampler, samples (tiny sizes)."""
    folder = captioned_folder(tmp_path / "captioned")
    lines = readme_block()
    stages = "ingest train-clip embed index knn curate train-prior train-decoder train-upsampler sample"
    assert [line.split()[1] for line in lines] == stages.split()
    for line in lines:
        args = line.split(" ", 1)[1].replace("~/pictures/captioned", str(folder))
        target = args.split()[0]
        words = re.findall(r'[A-Z_]+="[^"]*"|\S+', args)
        words = [w.replace('"', "") for w in words] + TINY.get(target, "").split()
        result = make(sandbox, *words)
        assert result.returncode == 0, f"{line}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
        if target == "ingest":
            assert "make train-clip NAME=mine" in result.stdout  # the next steps are printed
            config = yaml.safe_load((sandbox / "data" / "mine" / "data.yaml").read_text())
            assert config["name"] == "mine" and config["folder"] == str(folder.resolve())
            summary = json.loads((sandbox / "data" / "mine" / "download.json").read_text())
            assert summary["successes"] == 48 and set(summary["by_split"]) == {"train", "val"}
        if target == "curate":
            assert json.loads((sandbox / "data" / "mine" / "views" / "clean.json").read_text())["kept"] > 0
        if target == "knn":  # the named data set was searched: its captions are printed
            captions = pq.read_table(sandbox / "data" / "mine" / "index" / "ids.parquet").column("caption").to_pylist()
            assert sum(c[:40] in result.stdout for c in set(captions)) >= 5
    manifest = store.read_manifest(sandbox / "data" / "mine" / "embeddings")
    clip = json.loads((sandbox / "models" / "mine" / "clip" / "open_clip_config.json").read_text())
    assert manifest["encoder"]["model"] == "models/mine/clip" and manifest["dim"] == clip["model_cfg"]["embed_dim"]
    captions = set(store.read_table(sandbox / "data" / "mine" / "embeddings", ["caption"]).column(0).to_pylist())
    assert any("ünïcode ✓" in c for c in captions)
    for kind in ("clip", "prior", "decoder", "upsampler"):
        assert (sandbox / "models" / "mine" / kind).is_dir()
    assert (sandbox / "outputs" / "sample" / "a-red-circle-seed0.png").is_file()

    # Embedded again over three damaged tars among good ones (truncated, a corrupt member, empty): the good
    # ones are embedded, the damaged named, the trainers refuse; the repair, run as printed, completes it.
    keys = store.read_table(sandbox / "data" / "mine" / "embeddings", ["key"]).column("key").to_pylist()
    assert make(sandbox, "reset-embeddings", "NAME=mine").returncode == 0
    assert (
        not (sandbox / "data" / "mine" / "embeddings").exists() and not (sandbox / "data" / "mine" / "index").exists()
    )
    tars = sorted((sandbox / "data" / "mine" / "shards").glob("*.tar"))
    for tar, how in zip(tars[1:4], ("truncated", "corrupt member", "empty")):
        damage(tar, how)
    names = [t.stem for t in tars[1:4]]
    first = make(sandbox, "embed", "NAME=mine", "CLIP=models/mine/clip")  # the job exits 1, make then 2
    assert first.returncode != 0 and "3 damaged shard(s) not embedded" in first.stderr, first.stderr[-2000:]
    assert all(name in first.stderr for name in names)
    manifest = store.read_manifest(sandbox / "data" / "mine" / "embeddings")
    assert manifest["complete"] is False and sorted(manifest["damaged"]) == names
    assert manifest["shards"] == len(tars) - 3  # every good shard embedded
    with pytest.raises(ConfigError, match=", ".join(names)):
        store.complete_manifest(sandbox / "data" / "mine" / "embeddings")
    repair = re.search(r"^repair: (.*?)   \(", first.stderr, re.M).group(1)
    assert repair == f"make download NAME=mine REDO={','.join(names)} && make embed NAME=mine"  # the manifest's CLIP
    for command in repair.split(" && "):
        result = make(sandbox, *shlex.split(command)[1:])
        assert result.returncode == 0, f"{command}\n{result.stderr[-3000:]}"
    manifest = store.complete_manifest(sandbox / "data" / "mine" / "embeddings")
    assert manifest["damaged"] == {} and manifest["encoder"]["model"] == "models/mine/clip"
    after = store.read_table(sandbox / "data" / "mine" / "embeddings", ["key"]).column("key").to_pylist()
    assert sorted(after) == sorted(keys) and len(after) == len(set(after))  # every key exactly once


def test_a_variable_a_target_does_not_take_is_refused(sandbox):
    refused = make(sandbox, "sample", "PROMPT=a red circle", "SET=max_steps=3")  # a generation has no config
    assert refused.returncode == 2 and "make sample does not take SET" in refused.stderr
    refused = make(sandbox, "knn", "QUERY=a red circle", "PROMPT=a blue square")
    assert refused.returncode == 2 and "make knn does not take PROMPT" in refused.stderr
    twice = make(sandbox, "embed", "NAME=a", "CONFIG=configs/data/tiny.yaml")
    assert twice.returncode == 2 and "give the data set once" in twice.stderr
    demo = make(sandbox, "demo", "NAME=mine")
    assert demo.returncode == 2 and "make demo does not take NAME" in demo.stderr
    unknown = make(sandbox, "index", "NAME=nobody")
    assert unknown.returncode == 2 and "no data set named 'nobody'" in unknown.stderr
    environment = make(sandbox, "index", env={"NAME": "mine"})  # would silently index the default data set
    assert environment.returncode == 2 and "NAME set in the environment" in environment.stderr
    submit = make(sandbox, "submit", "JOB=index", "CLIP=x", env={"RAY_ADDRESS": "http://127.0.0.1:1"})
    assert submit.returncode == 2 and "make submit does not take CLIP" in submit.stderr


def damage(tar, how: str) -> None:
    """Cut a tar in half, overwrite a member header in its middle, or empty it."""
    data = tar.read_bytes()
    if how == "truncated":
        tar.write_bytes(data[: len(data) // 2])
    elif how == "corrupt member":
        with tarfile.open(tar) as t:
            offset = t.getmembers()[len(t.getmembers()) // 2].offset
        tar.write_bytes(data[:offset] + b"\xff" * 100 + data[offset + 100 :])
    else:
        tar.write_bytes(b"")


def test_every_kind_of_damage_is_a_damaged_tar_never_a_shorter_one(tiny_download, tmp_path):
    """Cut in a member's data, cut exactly at a header (tarfile alone would stop quietly), a member
    header overwritten, an empty file, a caption or metadata member that does not decode."""
    config, _, _ = tiny_download
    good = sorted(config.layout.shards.glob("*.tar"))[0]
    data = good.read_bytes()
    with tarfile.open(good) as t:
        members = t.getmembers()
    middle = members[len(members) // 2]
    json_member = next(m for m in members if m.name.endswith(".json"))
    cases = {
        "cut in data": data[: middle.offset_data + 10],
        "cut at a header": data[: middle.offset],
        "header overwritten": data[: middle.offset] + b"\xff" * 100 + data[middle.offset + 100 :],
        "empty": b"",
        "metadata garbled": data[: json_member.offset_data]
        + b"\xff" * json_member.size
        + data[json_member.offset_data + json_member.size :],
    }
    for name, content in cases.items():
        tar = tmp_path / f"{name}.tar"
        tar.write_bytes(content)
        with pytest.raises(DamagedTar):
            list(iter_tar_samples(tar))
    assert len(list(iter_tar_samples(good))) == len({m.name.rsplit(".", 1)[0] for m in members})


def test_a_damaged_embedding_shard_is_named_before_training(tiny_embed, tmp_path):
    from training.prior_job import load_prior_config, train_prior

    config, _ = tiny_embed
    shutil.copytree(config.layout.root, tmp_path / "tiny", ignore=shutil.ignore_patterns("source", "shards"))
    shard = sorted((tmp_path / "tiny" / "embeddings").glob("*.parquet"))[-1]
    shard.write_bytes(shard.read_bytes()[:100])
    settings = dict(load_prior_config(REPO / "configs/prior/tiny.yaml"), data_root=str(tmp_path))
    with pytest.raises(
        ConfigError, match=f"embedding shard .*{shard.name} cannot be read.*make embed REDO={shard.stem}"
    ):
        train_prior(**dict(settings, outputs_root=str(tmp_path / "out"), models_root=str(tmp_path / "models")))
    assert not (tmp_path / "out" / "train-prior-tiny" / "checkpoints").exists()  # refused before training


def test_download_never_trusts_stats_without_a_tar_nor_a_tar_without_stats(tiny_download, tmp_path):
    from dataclasses import replace

    from pipelines.data_config import run_download

    config, _, _ = tiny_download
    shutil.copytree(config.layout.root, tmp_path / "tiny")
    shards = tmp_path / "tiny" / "shards"
    before = {t.name: t.read_bytes() for t in sorted(shards.glob("*.tar"))}
    (shards / "00001.tar").unlink()  # stats say done, the tar is gone
    (shards / "00002_stats.json").unlink()  # a tar whose stats never came
    (shards / "00002.tar").write_bytes(b"half a tar")
    summary = run_download(replace(config, data_root=str(tmp_path)))
    assert summary["shards_downloaded_this_run"] == 2
    after = {t.name: t.read_bytes() for t in sorted(shards.glob("*.tar"))}
    assert after.keys() == before.keys()
    for name in ("00001.tar", "00002.tar"):  # the same samples (in the order the download's threads finished)
        fetched = sorted((x["key"], x["image"]) for x in iter_tar_samples(shards / name))
        assert fetched == sorted((x["key"], x["image"]) for x in iter_tar_samples(config.layout.shards / name))


def test_a_clip_is_named_by_folder_architecture_and_weights_or_tag(tmp_path):
    from embeddings.encoders import spec_from_text

    (tmp_path / "clip").mkdir()
    (tmp_path / "w.safetensors").write_bytes(b"")
    assert spec_from_text(str(tmp_path / "clip")) == {"model": str(tmp_path / "clip")}
    assert spec_from_text(f"ViT-B-32:{tmp_path / 'w.safetensors'}") == {
        "model": "ViT-B-32",
        "weights": str(tmp_path / "w.safetensors"),
    }
    assert spec_from_text("ViT-B-32:laion2b_s34b_b79k") == {"model": "ViT-B-32", "pretrained": "laion2b_s34b_b79k"}
    with pytest.raises(ConfigError, match="random weights"):
        spec_from_text("ViT-B-32")


def test_reset_embeddings_removes_the_embeddings_and_indices_and_nothing_else(tiny_embed, tmp_path):
    from dataclasses import replace

    from pipelines.data_config import reset_embeddings

    config, _ = tiny_embed
    shutil.copytree(config.layout.root, tmp_path / "tiny", ignore=shutil.ignore_patterns("source", "shards"))
    copy = replace(config, data_root=str(tmp_path))
    (copy.layout.index).mkdir(exist_ok=True)
    assert reset_embeddings(copy) == [copy.layout.embeddings, copy.layout.index]
    assert not copy.layout.embeddings.exists() and not copy.layout.index.exists()
    assert (copy.layout.urls).exists()  # the rest of the data set stays


def planted_folder(root, originals: int = 60, planted: int = 15):
    """Distinct textures (random colour grids, smoothed, with grain), and for `planted` of them four copies
    each: the same bytes, re-encoded (JPEG quality 60), resized (80%) and cropped by one pixel a side."""
    root.mkdir(parents=True)
    families = {}
    for i in range(originals):
        rng = np.random.default_rng(i)
        grid = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((96, 96), Image.BICUBIC)
        pixels = np.asarray(grid).astype(np.int16) + rng.integers(-12, 13, (96, 96, 3))
        image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
        image.save(root / f"t{i:03d}.jpg", quality=95)
        (root / f"t{i:03d}.txt").write_text(f"texture number {i}\n")
        if i < planted:
            shutil.copy(root / f"t{i:03d}.jpg", root / f"t{i:03d}-copy.jpg")
            image.save(root / f"t{i:03d}-reencoded.jpg", quality=60)
            image.resize((77, 77), Image.BICUBIC).save(root / f"t{i:03d}-resized.jpg", quality=95)
            image.crop((1, 1, 95, 95)).save(root / f"t{i:03d}-cropped.jpg", quality=95)
            for variant in ("copy", "reencoded", "resized", "cropped"):
                (root / f"t{i:03d}-{variant}.txt").write_text(f"texture number {i}, {variant}\n")
            families[i] = [f"t{i:03d}"] + [f"t{i:03d}-{v}" for v in ("copy", "reencoded", "resized", "cropped")]
    return families


@pytest.mark.slow
def test_make_curate_finds_planted_duplicates_in_an_ingested_folder_and_a_prior_trains_on_the_view(sandbox, tmp_path):
    """make ingest, embed (the committed CLIP), curate, then train-prior on the view, as the README says: every
    planted copy is grouped with its original (recall and precision over the planted pairs ≥ 0.95), exactly one
    of each family kept, byte-identical copies named as such, and the prior reads only kept keys."""
    families = planted_folder(tmp_path / "textures")
    for args in (("ingest", f"FOLDER={tmp_path / 'textures'}", "NAME=planted"), ("embed", "NAME=planted")):
        result = make(sandbox, *args)
        assert result.returncode == 0, result.stderr[-3000:]
    # At the default threshold (0.98): the committed CLIP puts these copies at 0.995 and above and the
    # distinct textures at 0.953 and below (printed below).
    result = make(sandbox, "curate", "NAME=planted", "VIEW=clean")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "view 'clean': kept" in result.stdout
    rows = pq.read_table(sandbox / "data" / "planted" / "views" / "clean.parquet").to_pylist()
    summary = json.loads((sandbox / "data" / "planted" / "views" / "clean.json").read_text())
    assert summary["rows"] == len(rows) == summary["kept"] + sum(summary["dropped"].values())
    urls = store.read_table(sandbox / "data" / "planted" / "embeddings", ["key", "url"]).to_pydict()
    name_of = {k: u.rsplit("/", 1)[-1].removesuffix(".jpg") for k, u in zip(urls["key"], urls["url"])}
    family_of = {name: i for i, names in families.items() for name in names}
    by_name = {name_of[r["key"]]: r for r in rows}
    copies = [n for names in families.values() for n in names[1:]]
    group = lambda n: by_name[n]["duplicate_of"] or by_name[n]["key"]  # the key its group kept
    recall = sum(group(n) == group(n.split("-")[0]) for n in copies) / len(copies)  # with its original
    dropped = [r for r in rows if r["reason"] in ("near_duplicate", "exact_duplicate")]
    right = [
        r for r in dropped if family_of.get(name_of[r["key"]], -1) == family_of.get(name_of[r["duplicate_of"]], -2)
    ]
    precision = len(right) / max(len(dropped), 1)
    vectors = store.read_table(sandbox / "data" / "planted" / "embeddings", ["key", "image_embedding"])
    unit = dict(zip(vectors.column("key").to_pylist(), store.arrow_to_vectors(vectors.column("image_embedding"))))
    key_of = {n: k for k, n in name_of.items()}
    distinct = np.stack([unit[key_of[f"t{i:03d}"]] for i in range(60)])
    cosines = distinct @ distinct.T
    planted_cosines = [unit[key_of[n]] @ unit[key_of[names[0]]] for names in families.values() for n in names[1:]]
    print(
        f"planted duplicates: recall {recall:.3f}, precision {precision:.3f} ({len(copies)} copies); copies at cosine "
        f">= {min(planted_cosines):.4f}, distinct textures <= {cosines[~np.eye(60, dtype=bool)].max():.4f}"
    )
    assert recall >= 0.95 and precision >= 0.95
    for names in families.values():
        assert sum(by_name[n]["kept"] for n in names) == 1
    for i in families:  # of the two byte-identical files, one is dropped as such
        pair = [by_name[f"t{i:03d}"]["reason"], by_name[f"t{i:03d}-copy"]["reason"]]
        assert pair.count("exact_duplicate") == 1
    assert (sandbox / "data" / "planted" / "views" / "clean.html").is_file()
    result = make(sandbox, "train-prior", "NAME=planted", "SET=view=clean", "PRIOR_CONFIG=configs/prior/tiny.yaml")
    assert result.returncode == 0, result.stderr[-3000:]
