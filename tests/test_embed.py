"""The embed job: the shard contract, resume after a kill, skips, and the encoders it loads."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from embeddings import store
from embeddings.config import ConfigError
from embeddings.encoders import EncoderSpec, load_encoder
from embeddings.hardware import precision_name
from pipelines.embed import embed

from .conftest import REPO, kill_session, vectors_by_key


def _tar_keys(shards_dir):
    keys = []
    for tar_path in sorted(shards_dir.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            keys += sorted({m.name.rsplit(".", 1)[0] for m in tar})
    return keys


def test_rows_match_the_downloads_and_the_contract(tiny_embed):
    config, manifest = tiny_embed
    table = store.read_table(config.layout.embeddings)
    download = json.loads(config.layout.download_summary.read_text())
    assert manifest["rows"] == table.num_rows == download["successes"] - manifest["skipped"]
    assert sorted(table.column("key").to_pylist()) == _tar_keys(config.layout.shards)
    assert table.schema.field("image_embedding").type.value_type == "halffloat"
    assert table.schema.field("image_embedding").type.list_size == manifest["dim"] == 32
    for column in store.EMBEDDING_COLUMNS:
        norms = np.linalg.norm(store.arrow_to_vectors(table.column(column)), axis=1)
        assert np.allclose(norms, 1.0, atol=2e-3)
    assert {"url", "split", "shape", "colour", "width"} <= set(table.column_names)
    assert manifest["encoder"]["checksum"] and manifest["shards"] == len(list(config.layout.shards.glob("*.tar")))
    assert set(manifest["records"]) == {p.stem for p in config.layout.shards.glob("*.tar")}


def test_the_raw_clip_embeddings_are_recovered_from_the_norms(tiny_embed):
    """unit × norm is the CLIP's raw output (what Karlo's and Kandinsky's priors read), for images and
    captions; shards without the norms (older, or imported) say so instead of guessing."""
    import torch

    from embeddings.tars import iter_tar_samples
    from training.data import decode_image

    config, manifest = tiny_embed
    tar = sorted(config.layout.shards.glob("*.tar"))[0]
    table = store.read_shard(config.layout.embeddings / f"{tar.stem}.parquet")
    raw_i, raw_t = store.raw_vectors(table, "image_embedding"), store.raw_vectors(table, "text_embedding")
    precision = precision_name(manifest["encoder"]["compute_dtype"])
    encoder = load_encoder({"model": config.embed["encoder"]["model"], "precision": precision})  # as the job ran
    samples = {s["key"]: s for s in iter_tar_samples(tar)}
    keys = table.column("key").to_pylist()[:6]
    pixels = encoder.preprocess_on_device([np.asarray(decode_image(samples[k]["image"])) for k in keys])
    with torch.inference_mode():
        expected_i = encoder.model.encode_image(pixels.to(encoder.dtype)).float().numpy()
        expected_t = encoder.model.encode_text(encoder.tokenizer([samples[k]["caption"] for k in keys])).float().numpy()
    assert np.abs(np.linalg.norm(expected_i, axis=1) - 1).max() > 0.05  # raw vectors are not unit vectors
    np.testing.assert_allclose(raw_i[:6], expected_i, rtol=0.02, atol=0.02 * np.abs(expected_i).max())
    np.testing.assert_allclose(raw_t[:6], expected_t, rtol=0.02, atol=0.02 * np.abs(expected_t).max())
    with pytest.raises(ConfigError, match="no image_norm column"):
        store.raw_vectors(table.drop_columns(["image_norm"]), "image_embedding")


def test_second_run_gives_the_same_vectors(tiny_embed, tmp_path):
    config, _ = tiny_embed
    embed(config.layout.shards, tmp_path / "again", encoder=config.embed["encoder"], batch_size=7)
    first, again = vectors_by_key(config.layout.embeddings), vectors_by_key(tmp_path / "again")
    assert first.keys() == again.keys()
    assert max(np.abs(first[k] - again[k]).max() for k in first) <= 1e-3  # float16 rounding


def test_rerun_skips_finished_shards(tiny_embed):
    config, manifest = tiny_embed
    mtimes = {p: p.stat().st_mtime_ns for p in config.layout.embeddings.glob("*.parquet")}
    again = embed(config.layout.shards, config.layout.embeddings, **config.embed)
    assert {p: p.stat().st_mtime_ns for p in config.layout.embeddings.glob("*.parquet")} == mtimes
    assert again["rows"] == manifest["rows"]


def test_killed_run_resumes_to_the_same_result(tiny_embed, tmp_path):
    config, _ = tiny_embed
    out = tmp_path / "killed"
    script = (
        "from pipelines.embed import embed; "
        f"embed({str(config.layout.shards)!r}, {str(out)!r}, encoder={config.embed['encoder']!r}, batch_size=2)"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=REPO,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 120
        while not list(out.glob("*_record.json")) and time.time() < deadline:
            time.sleep(0.05)
    finally:
        kill_session(process.pid)
        process.wait()
    done_at_kill = len(list(out.glob("*_record.json")))
    total = len(list(config.layout.shards.glob("*.tar")))
    assert 1 <= done_at_kill < total, "the kill should land part-way through"
    assert store.read_manifest(out)["complete"] is False

    embed(config.layout.shards, out, encoder=config.embed["encoder"], batch_size=32)
    table = store.read_table(out, columns=["key"])
    keys = table.column("key").to_pylist()
    assert len(keys) == len(set(keys))
    reference, resumed = vectors_by_key(config.layout.embeddings), vectors_by_key(out)
    assert resumed.keys() == reference.keys()
    assert max(np.abs(reference[k] - resumed[k]).max() for k in reference) <= 1e-3


def test_a_rerun_with_precision_auto_computes_in_the_format_the_folder_recorded(tiny_embed, tmp_path):
    """precision auto measures the machine, and a busy machine can measure otherwise: a rerun that finishes a
    folder computes its missing shards in the format the manifest recorded, so they equal the first run's; a
    rerun that names the other format is refused before it adds a shard."""
    from embeddings.hardware import bf16_is_fast

    config, _ = tiny_embed
    other, chosen = ("fp32", "bf16") if bf16_is_fast("cpu") else ("bf16", "fp32")  # auto chooses `chosen` here
    out, model = tmp_path / other, config.embed["encoder"]["model"]
    embed(config.layout.shards, out, encoder={"model": model, "precision": other}, batch_size=32)
    first = vectors_by_key(out)
    lost = sorted(out.glob("*.parquet"))[0]
    lost.unlink()
    (out / lost.name.replace(".parquet", "_record.json")).unlink()

    manifest = embed(config.layout.shards, out, encoder={"model": model}, batch_size=32)
    again = vectors_by_key(out)
    assert precision_name(manifest["encoder"]["compute_dtype"]) == other
    assert again.keys() == first.keys()
    assert max(np.abs(first[k] - again[k]).max() for k in first) == 0
    lost.unlink()
    (out / lost.name.replace(".parquet", "_record.json")).unlink()
    with pytest.raises(ConfigError, match=f"holds shards computed in .*precision {chosen} would add"):
        embed(config.layout.shards, out, encoder={"model": model, "precision": chosen}, batch_size=32)
    assert not lost.exists()


def test_precision_names_and_dtypes_agree():
    import torch

    from embeddings.hardware import DTYPES, resolve_dtype

    for name, dtype in DTYPES.items():
        assert precision_name(dtype) == precision_name(str(dtype).removeprefix("torch.")) == name
        assert resolve_dtype(name, torch.device("cpu")) is dtype
    with pytest.raises(ValueError, match="float64"):
        precision_name("float64")


def test_corrupt_image_in_a_tar_is_skipped_and_counted(tiny_embed, tmp_path):
    config, _ = tiny_embed
    source = sorted(config.layout.shards.glob("*.tar"))[0]
    shards = tmp_path / "shards"
    shards.mkdir()
    corrupted = None
    with tarfile.open(source) as tar_in, tarfile.open(shards / source.name, "w") as tar_out:
        for member in tar_in:
            data = tar_in.extractfile(member).read()
            if member.name.endswith(".jpg") and corrupted is None:
                corrupted, data = member.name.rsplit(".", 1)[0], b"\xff\xd8 not really a jpeg"
            member.size = len(data)
            tar_out.addfile(member, io.BytesIO(data))
    manifest = embed(shards, tmp_path / "emb", encoder={"model": config.embed["encoder"]["model"]})
    record = manifest["records"][source.stem]
    assert record["skipped"] == {"image decode error: UnidentifiedImageError": 1}
    keys = store.read_table(tmp_path / "emb", columns=["key"]).column("key").to_pylist()
    assert corrupted not in keys and len(keys) == config.samples_per_shard - 1 - sum(
        1 for r in pq.read_table(source.with_suffix(".parquet")).column("status").to_pylist() if r != "success"
    )


def test_torchvision_decoding_embeds_what_pil_does_and_hands_it_what_it_cannot_read(tiny_embed, tmp_path):
    """decoder torchvision (the GPU path, here on the CPU): the same keys and vectors as PIL's (the two JPEG
    decoders differ by a grey level or so); in a tar with a PNG and a corrupt JPEG, the PNG is decoded by PIL and
    counted, the corrupt one skipped with PIL's reason, as the default path skips it."""
    from PIL import Image

    config, _ = tiny_embed
    model = config.embed["encoder"]
    embed(config.layout.shards, tmp_path / "tv", encoder=model, decoder="torchvision")
    reference, decoded = vectors_by_key(config.layout.embeddings), vectors_by_key(tmp_path / "tv")
    assert decoded.keys() == reference.keys()
    cosines = [
        float(reference[k] @ decoded[k]) / float(np.linalg.norm(reference[k]) * np.linalg.norm(decoded[k]))
        for k in reference
    ]
    assert min(cosines) > 0.99
    source = sorted(config.layout.shards.glob("*.tar"))[0]
    shards = tmp_path / "shards"
    shards.mkdir()
    changed = {}
    with tarfile.open(source) as tar_in, tarfile.open(shards / source.name, "w") as tar_out:
        for member in tar_in:
            data = tar_in.extractfile(member).read()
            if member.name.endswith(".jpg") and len(changed) < 2:
                key = member.name.rsplit(".", 1)[0]
                if not changed:  # a PNG under the .jpg name, as a hand-made tar may hold
                    buffer = io.BytesIO()
                    Image.open(io.BytesIO(data)).save(buffer, format="PNG")
                    changed[key], data = "png", buffer.getvalue()
                else:  # a JPEG's header, then nothing a decoder can read
                    changed[key], data = "corrupt", data[:64] + b"\x00" * 64
            member.size = len(data)
            tar_out.addfile(member, io.BytesIO(data))
    records = {}
    for decoder in ("torchvision", "pil"):
        manifest = embed(shards, tmp_path / f"odd-{decoder}", encoder=model, decoder=decoder)
        records[decoder] = manifest["records"][source.stem]
    assert records["torchvision"]["decoded_by_pil"] == 2  # the PNG, and the corrupt one PIL then refused too
    assert "decoded_by_pil" not in records["pil"]
    assert (
        records["torchvision"]["skipped"] == records["pil"]["skipped"] and sum(records["pil"]["skipped"].values()) == 1
    )
    keys = store.read_table(tmp_path / "odd-torchvision", columns=["key"]).column("key").to_pylist()
    kind_of = {kind: key for key, kind in changed.items()}
    assert kind_of["png"] in keys and kind_of["corrupt"] not in keys


def test_manifest_dim_that_disagrees_with_the_model_is_an_error(tiny_embed, tmp_path):
    config, manifest = tiny_embed
    encoder = dict(manifest["encoder"], dim=64)
    with pytest.raises(ConfigError, match="embedding dim 32 in the manifest disagrees with the model's dim 64"):
        store.check_compatible(manifest, encoder)
    with pytest.raises(ConfigError, match="made by another CLIP"):
        store.check_compatible(manifest, dict(manifest["encoder"], checksum="0" * 64))


def test_unknown_encoder_key_is_an_error(tmp_path):
    with pytest.raises(TypeError):
        embed(tmp_path, tmp_path / "out", encoder={"modle": "x"})


def test_open_clip_checkpoint_file_loads_like_the_folder(tiny_clip_dir, tmp_path):
    import open_clip
    import torch
    from safetensors.torch import load_file

    from .conftest import TINY_CLIP

    open_clip.add_model_config(_write_model_config(tmp_path, TINY_CLIP))
    torch.save({"state_dict": load_file(tiny_clip_dir / "open_clip_model.safetensors")}, tmp_path / "tiny.pt")
    from_file = load_encoder(EncoderSpec(model="unclip-tiny-test", weights=str(tmp_path / "tiny.pt")))
    from_folder = load_encoder({"model": str(tiny_clip_dir)})
    assert from_file.checksum == from_folder.checksum
    text = ["a small red circle at the top left on a gray background"]
    assert torch.allclose(from_file.encode_texts(text), from_folder.encode_texts(text), atol=1e-6)
    with pytest.raises(ConfigError, match="CLIP weights file not found"):
        load_encoder(EncoderSpec(model="unclip-tiny-test", weights=str(tmp_path / "missing.pt")))


def _write_model_config(folder, cfg):
    path = folder / "unclip-tiny-test.json"
    path.write_text(json.dumps(cfg))
    return path


def test_device_preprocessing_matches_open_clips_transform(tiny_clip_dir):
    import torch

    from pipelines import shapes

    encoder = load_encoder({"model": str(tiny_clip_dir)})
    rng = np.random.default_rng(0)
    images = [shapes.render(shapes.sample_scene(rng), size) for size in (64, 64, 80, 32)]
    reference = torch.stack([encoder.preprocess(image) for image in images])
    on_device = encoder.preprocess_on_device([np.asarray(image) for image in images])
    assert on_device.shape == reference.shape
    # Compared as pixels (0-255, normalisation undone): the same picture up to one grey level of
    # resampling difference where it is resized (64 and 80 px to 32), identical where it is not (32 px).
    std = torch.tensor(encoder.preprocess.transforms[-1].std).view(1, 3, 1, 1)
    levels = ((on_device - reference) * std * 255).abs()
    assert float(levels.max()) < 1.5 and float(levels.mean()) < 0.1
    assert float(levels[3].max()) < 1e-3


def test_shards_without_norm_columns_are_refused_by_name_before_raw_training(tiny_embed, tmp_path):
    """A model reading raw CLIP vectors checks every shard's norm columns before it trains (older or imported
    embeddings lack them): the shard is named; shards with them pass."""
    import pyarrow.parquet as pq

    from training.data import embedding_shards, require_norm_columns
    from training.streaming import Shard

    config, _ = tiny_embed
    shards = embedding_shards(config.layout.embeddings, "train")
    require_norm_columns(shards)
    old = tmp_path / "00000.parquet"
    pq.write_table(store.read_shard(shards[0].path).drop_columns(["text_norm"]), old)
    with pytest.raises(ConfigError, match=r"00000.parquet carry no text_norm column"):
        require_norm_columns(shards[1:] + [Shard(str(old), shards[0].count)])


def test_embedding_actors_that_chose_different_formats_are_refused(ray_local):
    """Each actor resolves precision auto itself; a job whose actors disagree would mix formats in one folder."""
    import ray

    from pipelines.embed import live_actors

    @ray.remote(num_cpus=0)
    class Measured:
        def __init__(self, compute_dtype: str):
            self.compute_dtype = compute_dtype

        def info(self) -> dict:
            return {"compute_dtype": self.compute_dtype}

    agreeing = [Measured.remote("float32"), Measured.remote("float32")]
    live, info = live_actors(agreeing)
    assert len(live) == 2 and info == {"compute_dtype": "float32"}
    disagreeing = [Measured.remote("float32"), Measured.remote("bfloat16")]
    with pytest.raises(ConfigError, match=r"different number formats \(bfloat16, float32\)"):
        live_actors(disagreeing)
    for actor in agreeing + disagreeing:
        ray.kill(actor)
