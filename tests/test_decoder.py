"""train-decoder / train-upsampler and the generation commands, on the tiny data set and tiny CLIP."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from embeddings import store
from embeddings.config import ConfigError
from training.decoder_data import ImageEmbeddingDataModule, joined_shards, tar_image_keys
from training.decoder_job import load_decoder_config, load_upsampler_config, train_decoder, train_upsampler
from training.export import load_decoder, load_upsampler

from .conftest import REPO, kill_session
from .test_prior import RecordBatches


@pytest.fixture(scope="module")
def trained(tiny_embed, tmp_path_factory):
    """Tiny prior, decoder and upsampler trained once into one models folder."""
    from training.prior_job import load_prior_config, train_prior

    config, _ = tiny_embed
    root = tmp_path_factory.mktemp("decoder")
    common = dict(
        data_root=config.data_root,
        models_root=str(root / "models"),
        outputs_root=str(root / "outputs"),
        precision="32",
    )
    train_prior(**dict(load_prior_config(REPO / "configs/prior/tiny.yaml"), **common, val_every=1000))
    records = {}
    for kind, load, train in (
        ("decoder", load_decoder_config, train_decoder),
        ("upsampler", load_upsampler_config, train_upsampler),
    ):
        record = RecordBatches()
        _with_callback(
            record,
            lambda: train(
                **dict(
                    load(REPO / f"configs/decoder/{'tiny' if kind == 'decoder' else 'upsampler-tiny'}.yaml"),
                    **common,
                    max_steps=40,
                    val_every=20,
                    checkpoint_every=20,
                )
            ),
        )
        records[kind] = record
    return root, common, records


def _with_callback(callback, run):
    import training.decoder_job as job

    original = job.build_trainer
    job.build_trainer = lambda *a, **k: original(*a, **dict(k, callbacks=[callback]))
    try:
        return run()
    finally:
        job.build_trainer = original


@pytest.mark.parametrize("kind", ["decoder", "upsampler"])
def test_tiny_models_learn_export_and_draw_grids(trained, kind):
    root, _, records = trained
    losses = records[kind].losses
    assert len(losses) == 40 and np.mean(losses[-8:]) < np.mean(losses[:8])
    config = json.loads((root / "models" / "tiny" / kind / "config.json").read_text())
    assert config["clip"]["checksum"] and config["metrics"]["step"] == 40
    grids = sorted((root / "outputs" / f"train-{kind}-tiny" / "samples").glob("step*.png"))
    assert [g.name for g in grids] == ["step000020.png", "step000040.png"]
    # Decoder: real images above their decodings; upsampler: bicubic, sampled, real. 8 val samples a row.
    cells = grid_cells(grids[-1], columns=8, rows=2 if kind == "decoder" else 3)
    assert not np.array_equal(cells[0], cells[1]) and cells[-1].std() > 0


def grid_cells(path, columns: int, rows: int, cell: int = 128, gap: int = 2) -> np.ndarray:
    """The cells (rows, columns, cell, cell, 3) of a PNG grid that must be exactly `columns` × `rows`."""
    image = np.asarray(Image.open(path).convert("RGB"))
    assert image.shape == (rows * (cell + gap) + gap, columns * (cell + gap) + gap, 3), (path, image.shape)
    return np.stack(
        [
            np.stack(
                [image[gap + r * (cell + gap) :][:cell, gap + c * (cell + gap) :][:, :cell] for c in range(columns)]
            )
            for r in range(rows)
        ]
    )


def test_sampling_shape_dtype_and_seeded(trained):
    root, _, _ = trained
    decoder = load_decoder(root / "models" / "tiny" / "decoder")
    z = torch.nn.functional.normalize(torch.randn(3, decoder.config.dim), dim=-1)
    a = decoder.sample(z, [5, 6, 7], steps=4)
    assert a.shape == (3, 3, 8, 8) and a.dtype == torch.float32 and float(a.std((1, 2, 3)).min()) > 0
    b = decoder.sample(z[[2, 0]], [7, 5], steps=4)  # another batch: the same seed gives the same image
    torch.testing.assert_close(b, a[[2, 0]], atol=1e-5, rtol=0)
    assert not torch.allclose(decoder.sample(z[:1], [99], steps=4), a[:1])
    upsampler = load_upsampler(root / "models" / "tiny" / "upsampler")
    z_up = torch.nn.functional.normalize(torch.randn(3, upsampler.config.dim), dim=-1)
    high = upsampler.sample(a, [1, 2, 3], z_up, steps=4)
    assert high.shape == (3, 3, 32, 32)
    torch.testing.assert_close(upsampler.sample(a[1:2], [2], z_up[1:2], steps=4), high[1:2], atol=1e-5, rtol=0)
    assert not torch.allclose(upsampler.sample(a, [1, 2, 3], steps=4), high)  # the embedding is an input


def test_loading_an_export_reproduces_the_module(trained, tmp_path):
    """A module (the trained export's settings, its EMA restored from the trained weights) exported and
    loaded back samples the same images as the module's own sampler; its live net, another network, does not."""
    from training.decoder import DecoderModule
    from training.export import save_export
    from training.samplers import DecoderSampler

    root, _, _ = trained
    folder = root / "models" / "tiny" / "decoder"
    config = json.loads((folder / "config.json").read_text())
    module = DecoderModule(config["decoder"], **config["hparams"])
    module.ema.load_state_dict(load_decoder(folder).net.state_dict())  # net stays as initialised
    save_export(tmp_path / "decoder", "decoder", module.ema, module.export_config(), {"model": "m", "checksum": "c"})
    loaded = load_decoder(tmp_path / "decoder", clip_checksum="c")
    z = torch.nn.functional.normalize(torch.randn(2, loaded.config.dim), dim=-1)
    expected = module.eval().sampler.sample(z, [0, 1], steps=4)
    torch.testing.assert_close(loaded.sample(z, [0, 1], steps=4), expected, atol=1e-6, rtol=0)
    live = DecoderSampler(module.net, module.text, module.hparams.prediction_type, sampling={"steps": 4})
    assert not torch.allclose(live.sample(z, [0, 1]), expected)


def test_key_join_drops_only_the_unmatched(tiny_embed, tmp_path):
    """Remove two embedding rows and add one for a key with no image: exactly those are dropped and counted,
    and every joined sample carries its own key's embedding."""
    config, _ = tiny_embed
    layout = config.layout
    shards, embeddings = tmp_path / "shards", tmp_path / "embeddings"
    shutil.copytree(layout.shards, shards)
    shutil.copytree(layout.embeddings, embeddings)
    name = store.shard_name(store.shard_paths(embeddings)[-1])
    table = pq.read_table(embeddings / f"{name}.parquet")
    keys = table.column("key").to_pylist()
    dropped = set(keys[1:3])
    kept = table.filter(pa.array([k not in dropped for k in keys]))
    stray = kept.slice(0, 1).set_column(0, "key", pa.array(["no-such-key"]))
    pq.write_table(pa.concat_tables([kept, stray]), embeddings / f"{name}.parquet")

    before, _ = joined_shards(layout.shards, layout.embeddings, None)
    after, report = joined_shards(shards, embeddings, None)
    assert sum(s.count for s in after) == sum(s.count for s in before) - 2
    assert (report.missing_embedding, report.missing_image, report.missing_shards) == (2, 1, [])

    datamodule = ImageEmbeddingDataModule(str(shards), str(embeddings), image_size=8, seed=0)
    original = store.read_table(layout.embeddings, ["key", "image_embedding"])
    vector_of = dict(
        zip(original.column("key").to_pylist(), store.arrow_to_vectors(original.column("image_embedding")))
    )
    seen = []
    for shard in after:
        for row in datamodule.read(shard, 0, shard.count):
            np.testing.assert_array_equal(row["image_embedding"], vector_of[row["key"]])
            assert row["image"].shape == (8, 8, 3) and row["image"].dtype == np.uint8
            seen.append(row["key"])
    all_keys = [k for s in before for k in tar_image_keys(s.path)]
    assert len(seen) == len(set(seen)) and set(seen) == set(all_keys) - dropped


def test_decoder_resumes_mid_epoch_on_the_same_batch(trained, tmp_path):
    _, common, _ = trained
    settings = dict(
        load_decoder_config(REPO / "configs/decoder/tiny.yaml"), **common, val_every=1000, checkpoint_every=3
    )
    full = RecordBatches()
    _with_callback(full, lambda: train_decoder(**dict(settings, outputs_root=str(tmp_path / "full"), max_steps=9)))
    cut = RecordBatches(stop_at=6)
    _with_callback(cut, lambda: train_decoder(**dict(settings, outputs_root=str(tmp_path / "cut"), max_steps=9)))
    resumed = RecordBatches()
    _with_callback(resumed, lambda: train_decoder(**dict(settings, outputs_root=str(tmp_path / "cut"), max_steps=9)))
    assert cut.keys + resumed.keys == full.keys
    np.testing.assert_allclose(resumed.losses, full.losses[6:], rtol=1e-4)


def test_generation_commands_write_pngs(trained, tmp_path, tiny_embed):
    from training.__main__ import main

    root, _, _ = trained
    config, _ = tiny_embed
    models = str(root / "models" / "tiny")
    tar = sorted(config.layout.shards.glob("*.tar"))[0]
    images = []
    import tarfile

    with tarfile.open(tar) as t:
        for member in t:
            if member.name.endswith(".jpg") and len(images) < 2:
                path = tmp_path / member.name
                path.write_bytes(t.extractfile(member).read())
                images.append(str(path))
    commands = {
        "sample": ["--prompt", "a red circle", "--prompt", "a blue square", "-n", "2"],
        "variations": ["--image", images[0], "-n", "3"],
        "interpolate": ["--a", images[0], "--b", images[1], "-n", "4"],
        "textdiff": ["--image", images[0], "--from", "a red circle", "--to", "a blue circle", "-n", "3"],
    }
    shapes = {"sample": (2, 2), "variations": (3, 1), "interpolate": (4, 1), "textdiff": (3, 1)}  # columns, rows
    for job, args in commands.items():
        out = tmp_path / f"{job}.png"
        assert main([job, "--models", models, "--steps", "3", "--out", str(out), *args]) == 0
        cells = grid_cells(out, *shapes[job])
        assert not np.array_equal(cells[0, 0], cells[-1, -1]), f"{job}: the first and last image are the same"
        again = tmp_path / f"{job}-again.png"
        assert main([job, "--models", models, "--steps", "3", "--out", str(again), *args]) == 0
        assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again))), (
            f"{job}: same seed, another image"
        )


def test_a_component_of_another_clip_is_refused(trained, tmp_path):
    from training.export import load_export

    root, _, _ = trained
    folder = tmp_path / "decoder"
    shutil.copytree(root / "models" / "tiny" / "decoder", folder)
    with pytest.raises(ConfigError, match="another CLIP"):
        load_export(folder, "decoder", clip_checksum="0" * 64)
    config = json.loads((folder / "config.json").read_text())
    config["clip"]["checksum"] = "f" * 64
    (folder / "config.json").write_text(json.dumps(config))
    from training.generate import UnCLIP

    shutil.copytree(root / "models" / "tiny" / "prior", tmp_path / "prior")
    with pytest.raises(ConfigError, match="not the one"):
        UnCLIP.load(tmp_path)


def test_eval_compares_unclip_with_the_text_conditioned_baseline(trained, tiny_embed, tmp_path):
    """make eval on tiny models: every (system, scale, set) cell is measured and the outputs are written."""
    from training.unclip_eval import compare, comparison_table, evaluate

    root, common, _ = trained
    config, _ = tiny_embed
    train_decoder(
        **dict(
            load_decoder_config(REPO / "configs/decoder/tiny.yaml"),
            **common,
            condition="text",
            export="decoder-text",
            max_steps=6,
            val_every=1000,
        )
    )
    summary = evaluate(
        str(REPO / "configs/data/tiny.yaml"),
        root / "models" / "tiny",
        tmp_path / "eval",
        captions=3,
        per_caption=2,
        guidance_scales=(1.0,),
        steps=3,
        upsampler_steps=2,
        data_root=config.data_root,
    )
    cells = {(r["system"], r["guidance"], r["split"]) for r in summary["results"]}
    expected = {(s, g, split) for s in ("unclip", "glide_like") for g in (1.0, 3.0) for split in ("val", "heldout")}
    at_default = {(s, 3.0, split) for s in ("unclip_full", "decoder_true_z") for split in ("val", "heldout")}
    assert cells == expected | at_default
    assert summary["captions_per_set"] == 3 and summary["per_caption"] == 2
    for r in summary["results"]:
        assert r["images"] == 6  # 3 captions, 2 images each
        assert len(r["fidelity_per_caption"]) == 3 and 0 <= r["fidelity"] <= 1
        low, high = r["fidelity_interval"]
        assert low <= r["fidelity"] <= high
        for attribute in ("colour", "shape", "size", "position"):  # a mean over 1-3 captions of k/2 images
            accuracy = r[f"{attribute}_accuracy"]
            assert accuracy is None or accuracy * 12 == pytest.approx(round(accuracy * 12))
        assert r["diversity_pixels"] > 0 and r["diversity_clip"] > 0  # each caption's two seeds differ
    assert {k: len(v) for k, v in summary["diversity_at_equal_clip_score"].items()} == {"pixels": 4, "clip": 4}
    assert {(d["split"], d["guidance"]) for d in summary["unclip_minus_glide_like"]} == {
        (split, g) for split in ("val", "heldout") for g in (1.0, 3.0)
    }
    prior = summary["prior"]
    assert prior["captions"] > 3 and prior["samples_per_caption"] == 8
    assert prior["text_embedding"]["open_diversity"] in (0.0, None)  # one embedding per caption: no spread
    assert -1 <= prior["cosine_unrelated"] <= 1 and 0 <= prior["prior"]["fidelity"] <= 1
    assert "Δ open diversity" in (tmp_path / "eval" / "table.md").read_text()
    for r in summary["results"]:  # 3 captions of 2 images each: the mean of the captions' means is the mean
        assert len(r["clip_score_per_caption"]) == 3
        assert np.mean(r["clip_score_per_caption"]) == pytest.approx(r["clip_score"], abs=1e-6)
    same = compare(tmp_path / "eval", tmp_path / "eval")  # a folder against itself: nothing moved
    assert {(c["split"], c["guidance"]) for c in same["cells"]} == {(s, g) for s in ("val", "heldout") for g in (1, 3)}
    for c in same["cells"]:
        for m in ("fidelity", "open_diversity", "clip_score"):
            assert c[m]["difference"] is None or c[m]["difference"]["mean"] == 0
    assert "| mean of the cells |" in comparison_table(same)
    for name in (
        "metrics.json",
        "table.md",
        "guidance.png",
        "diversity_fidelity.png",
        "samples-heldout-unclip.png",
        "samples-val-glide_like.png",
    ):
        assert (tmp_path / "eval" / name).stat().st_size > 0


def test_the_decoder_alone_is_given_each_rows_own_image_embedding_raw_where_it_reads_raw_vectors():
    import torch

    from training.unclip_eval import true_embeddings

    rows = [
        {"image_embedding": [0.6, 0.8], "image_norm": 10.0},
        {"image_embedding": [1.0, 0.0], "image_norm": 2.0},
    ]
    unit = true_embeddings(rows, 3, raw=False)
    raw = true_embeddings(rows, 3, raw=True)
    assert unit.shape == raw.shape == (6, 2)  # 3 per row, row-major as text_to_image orders prompts
    assert torch.allclose(unit[:3], torch.tensor([0.6, 0.8])) and torch.allclose(unit[3:], torch.tensor([1.0, 0.0]))
    assert torch.allclose(raw[:3], torch.tensor([6.0, 8.0])) and torch.allclose(raw[3:], torch.tensor([2.0, 0.0]))
    with pytest.raises(ConfigError, match="image_norm"):
        true_embeddings([{"image_embedding": [1.0, 0.0]}], 1, raw=True)


def test_frechet_distance_and_diversity():
    from training.unclip_eval import frechet_distance, mean_pairwise

    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 4))
    assert frechet_distance(a, a) == pytest.approx(0, abs=1e-6)
    assert frechet_distance(a, a + 1) == pytest.approx(4, abs=1e-6)  # a mean shift of 1 in 4 dims
    same = np.zeros((4, 2, 2, 3))
    assert mean_pairwise(same, 2, "rms") == 0
    apart = np.stack([np.zeros((2, 2, 3)), np.ones((2, 2, 3))] * 2)
    assert mean_pairwise(apart, 2, "rms") == pytest.approx(1)


def _two_process_decoder(tiny_embed, out, launcher: str = "lightning", strategy: str = "ddp") -> dict:
    """The tiny decoder trained 6 steps on two CPU processes (validating at 3 and 6); its export's config."""
    config, _ = tiny_embed
    overrides = [
        f"data_root={config.data_root}",
        "devices=2",
        f"strategy={strategy}",
        "accelerator=cpu",
        "precision=32",
        f"launcher={launcher}",
        "max_steps=6",
        "val_every=3",
        "checkpoint_every=3",
        f"models_root={out / 'models'}",
        f"outputs_root={out / 'outputs'}",
    ]
    command = [sys.executable, "-m", "training", "decoder", "--config", "configs/decoder/tiny.yaml"]
    command += [arg for o in overrides for arg in ("--set", o)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own Ray, not the session's
    process = subprocess.Popen(
        command, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        output, _ = process.communicate(timeout=600)
    finally:
        kill_session(process.pid)
    assert process.returncode == 0, output[-3000:]
    exported = json.loads((out / "models" / "tiny" / "decoder" / "config.json").read_text())
    assert exported["metrics"]["step"] == 6 and math.isfinite(exported["metrics"]["val_loss"])
    assert (out / "outputs" / "train-decoder-tiny" / "samples" / "step000006.png").is_file()
    return exported


def test_decoder_trains_and_exports_on_two_ray_train_workers(tiny_embed, tmp_path):
    """DDP on two CPU processes started by Ray Train: every rank reaches the final validation (a collective) and
    rank 0 exports."""
    _two_process_decoder(tiny_embed, tmp_path, launcher="ray")


def test_the_decoder_sharded_with_fsdp2_trains_as_ddp_does(tiny_embed, tmp_path):
    """Two CPU processes, DDP and then fsdp2 (the UNet's blocks and the EMA copy sharded; the grids drawn by every
    rank): both export after the final validation, with the same EMA weights and val loss (fp32)."""
    from safetensors.torch import load_file

    ddp = _two_process_decoder(tiny_embed, tmp_path / "ddp")
    sharded = _two_process_decoder(tiny_embed, tmp_path / "fsdp2", strategy="fsdp2")
    assert sharded["metrics"]["val_loss"] == pytest.approx(ddp["metrics"]["val_loss"], rel=1e-4)
    weights = [load_file(tmp_path / run / "models/tiny/decoder/decoder.safetensors") for run in ("ddp", "fsdp2")]
    assert weights[0].keys() == weights[1].keys()
    # fp32 sums in another order, through 6 AdamW steps (which scale small gradients up): equal to well within
    # one step's size (lr 1e-3), where an unsynchronised or unsharded-wrong run would differ by steps
    deviation = max(float((weights[1][k] - weights[0][k]).abs().max()) for k in weights[0])
    assert deviation < 1e-4, deviation


def test_diversity_at_equal_clip_score_interpolates_along_the_baseline():
    from training.unclip_eval import diversity_at_equal_clip_score

    results = [
        {"system": "glide_like", "split": "val", "guidance": g, "clip_score": c, "diversity_clip": d}
        for g, c, d in ((1.0, 0.9, 0.3), (3.0, 0.5, 0.1))
    ]
    results += [
        {"system": "unclip", "split": "val", "guidance": g, "clip_score": c, "diversity_clip": 0.4}
        for g, c in ((1.0, 0.7), (3.0, 0.95))
    ]
    points = diversity_at_equal_clip_score(results, "unclip", "glide_like", "diversity_clip")
    assert points[0]["glide_like"] == pytest.approx(0.2) and points[0]["unclip"] == 0.4
    assert points[1]["glide_like"] is None  # outside the baseline's range of CLIP scores


def test_clip_scores_per_caption_average_each_captions_own_images():
    """Images are caption-major: caption i's scores are the mean over its own per_caption images."""
    from training.unclip_eval import score

    class Encoder:  # a plain image's embedding turns from the text's direction as its grey level rises
        def preprocess_on_device(self, images):
            return images

        def encode_images(self, images):
            angles = [float(image.mean()) / 255 * math.pi / 2 for image in images]
            return torch.tensor([[math.cos(a), math.sin(a)] for a in angles])

        def encode_texts(self, texts):
            return torch.tensor([[1.0, 0.0]] * len(texts))

    images = np.stack([np.full((16, 16, 3), level, np.uint8) for level in (0, 0, 255, 255, 0, 255)])
    row = {"caption": "x", "colour": "red", "shape": "circle", "size": "large", "position": "center"}
    rows = [dict(row, background="gray") for _ in range(3)]
    reference = {"background": 1.0, "position": 1.0, "size": 1.0}
    metrics = score(images, rows, 2, Encoder(), np.random.default_rng(0).normal(size=(10, 2)), reference)
    assert metrics["clip_score_per_caption"] == pytest.approx([1.0, 0.0, 0.5], abs=1e-6)
    assert metrics["clip_score"] == pytest.approx(0.5, abs=1e-6)


def _eval_folder(folder, fidelity: list, clip_score: list, captions: str = "val: a red circle\n", **settings):
    """A `make eval` folder holding one unclip cell (val, guidance 1) with these per-caption figures (open
    diversity: fidelity / 2, so that the two cannot be mixed up)."""
    folder.mkdir()
    cell = {"system": "unclip", "split": "val", "guidance": 1.0}
    diversity = [None if f is None else f / 2 for f in fidelity]
    for name, values in (("fidelity", fidelity), ("open_diversity", diversity), ("clip_score", clip_score)):
        defined = [v for v in values if v is not None]
        cell[name], cell[f"{name}_per_caption"] = (float(np.mean(defined)) if defined else None), values
    summary = {"captions_per_set": len(fidelity), "per_caption": 4, "decoder_steps": 40, "upsampler_steps": 8}
    summary.update({"seed": 0, "results": [cell], **settings})
    (folder / "metrics.json").write_text(json.dumps(summary))
    (folder / "captions.txt").write_text(captions)
    return folder


def test_eval_compare_pairs_the_same_captions_and_refuses_folders_drawn_differently(tmp_path):
    from training.unclip_eval import compare, comparison_table

    before = _eval_folder(tmp_path / "before", [0.5, 1.0, None], [0.2, 0.3, 0.4])
    after = _eval_folder(tmp_path / "after", [0.75, 0.5, 1.0], [0.3, 0.3, 0.6])
    (cell,) = compare(before, after)["cells"]
    assert cell["fidelity"]["before"] == 0.75 and cell["fidelity"]["after"] == 0.75
    # paired over the captions both define: (0.25 − 0.5) / 2, where the unpaired means are equal
    assert cell["fidelity"]["difference"]["mean"] == pytest.approx(-0.125)
    assert cell["fidelity"]["difference"]["captions"] == 2
    assert cell["open_diversity"]["difference"]["mean"] == pytest.approx(-0.0625)
    assert cell["clip_score"]["difference"]["mean"] == pytest.approx(0.1)
    table = comparison_table(compare(before, after))
    assert "| val | 1 | 0.750 → 0.750 | -0.125 [" in table and "| mean of the cells | |" in table
    for name, kwargs in (
        ("other-captions", {"captions": "val: a blue square\n"}),
        ("other-steps", {"decoder_steps": 20}),
        ("other-seed", {"seed": 1}),
    ):
        with pytest.raises(ValueError, match="not drawn alike"):
            compare(before, _eval_folder(tmp_path / name, [0.5, 1.0, None], [0.2, 0.3, 0.4], **kwargs))
    older = _eval_folder(tmp_path / "older", [0.5, 1.0, None], [0.2, 0.3, 0.4])
    summary = json.loads((older / "metrics.json").read_text())
    del summary["results"][0]["clip_score_per_caption"]
    (older / "metrics.json").write_text(json.dumps(summary))
    with pytest.raises(ValueError, match="older `make eval`"):
        compare(older, after)
    with pytest.raises(FileNotFoundError, match="run `make eval"):
        compare(before, tmp_path / "missing")
    with pytest.raises(ValueError, match="no cell of system 'glide_like'"):
        compare(before, after, "glide_like")
    # a cell where no caption leaves anything open has no open diversity: shown as '–', left out of the means
    closed = _eval_folder(tmp_path / "closed", [None, None, None], [0.2, 0.3, 0.4])
    table = comparison_table(compare(closed, closed))
    assert "| – → – | – |" in table and "| mean of the cells | | – → – | – |" in table


@pytest.mark.parametrize(
    "name", ["tiny", "small", "small-cross-attention", "text-small", "text-small-cross-attention", "laion-64px"]
)
def test_every_attention_layer_has_heads_of_head_width(name):
    """channels // head_width heads of head_width each (diffusers reads its argument as a head count)."""
    from training.decoder_net import DecoderConfig, build_decoder
    from training.export import attention_layout

    sizes = dict(load_decoder_config(REPO / f"configs/decoder/{name}.yaml")["decoder"])
    sizes.setdefault("dim", sizes.get("text_token_width") or 64)
    if sizes.get("layout") == "karlo":  # its tokens are as wide as dim (the job takes the width from the CLIP)
        sizes.setdefault("text_token_width", sizes["dim"])
    with torch.device("meta"):  # the 0.87 B-parameter config too, without allocating it
        net = build_decoder(DecoderConfig(**sizes))
    layout = attention_layout(net)
    assert len(layout) > 0 and {width for _, width in layout} == {sizes["head_width"]}
    assert {heads * width for heads, width in layout} == set(sizes["channels"][1:])


def test_an_export_or_checkpoint_of_another_head_layout_is_refused(trained, tmp_path):
    """The same weights load under any head split, so the split is recorded and checked."""
    root, common, _ = trained
    folder = tmp_path / "decoder"
    shutil.copytree(root / "models" / "tiny" / "decoder", folder)
    config = json.loads((folder / "config.json").read_text())
    for record, message in (
        (dict(config, layout=[[h * 2, w // 2] for h, w in config["layout"]]), "attention layout .* differs"),
        ({k: v for k, v in config.items() if k != "layout"}, "records no attention layout"),
        ({k: v for k, v in config.items() if k != "format"}, "export format 1"),
    ):
        (folder / "config.json").write_text(json.dumps(record))
        with pytest.raises(ConfigError, match=message):
            load_decoder(folder)
    checkpoint = torch.load(root / "outputs" / "train-decoder-tiny" / "checkpoints" / "last.ckpt", weights_only=True)
    checkpoint["layout"] = [[h * 2, w // 2] for h, w in checkpoint["layout"]]
    torch.save(checkpoint, tmp_path / "other-heads.ckpt")
    settings = dict(load_decoder_config(REPO / "configs/decoder/tiny.yaml"), **dict(common, outputs_root=str(tmp_path)))
    with pytest.raises(ConfigError, match="attention layout .* differs"):
        train_decoder(**dict(settings, resume=str(tmp_path / "other-heads.ckpt"), max_steps=60))


def test_an_upsampler_of_another_clip_is_refused(trained, tmp_path):
    """The upsampler reads z_i, so UnCLIP.load checks its CLIP like the prior's and the decoder's."""
    from training.generate import UnCLIP

    root, _, _ = trained
    for kind in ("decoder", "prior", "upsampler"):
        shutil.copytree(root / "models" / "tiny" / kind, tmp_path / kind)
    assert UnCLIP.load(tmp_path).upsampler is not None
    config = json.loads((tmp_path / "upsampler" / "config.json").read_text())
    config["clip"]["checksum"] = "f" * 64
    (tmp_path / "upsampler" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="upsampler .* was trained against another CLIP"):
        UnCLIP.load(tmp_path)


def _train_tiny(train, config_path, tiny_embed, tmp_path, **overrides) -> RecordBatches:
    """A short run of `train` (train_decoder or train_upsampler) on the tiny data, fp32, no validation, its
    export under tmp_path/models; returns the recorded batches and losses."""
    config, _ = tiny_embed
    load = load_decoder_config if train is train_decoder else load_upsampler_config
    settings = dict(load(REPO / config_path), data_root=config.data_root)
    run = dict(
        val_every=1000,
        precision="32",
        models_root=str(tmp_path / "models"),
        outputs_root=str(tmp_path / "outputs"),
    )
    record = RecordBatches()
    _with_callback(record, lambda: train(**{**settings, **run, **overrides}))
    return record


def test_tiny_decoder_trains_with_clip_text_tokens(tiny_embed, tmp_path):
    """text_tokens: clip (the full-size configs' setting) on the CPU: per-token encodings from the frozen
    CLIP, their width taken from it, a few steps, an export that samples with and without captions."""
    record = _train_tiny(
        train_decoder, "configs/decoder/tiny.yaml", tiny_embed, tmp_path, text_tokens="clip", max_steps=3
    )
    assert len(record.losses) == 3 and all(math.isfinite(loss) for loss in record.losses)
    decoder = load_decoder(tmp_path / "models" / "tiny" / "decoder")
    assert decoder.config.text_token_width == 32  # the tiny CLIP's text width
    z = torch.nn.functional.normalize(torch.randn(2, decoder.config.dim), dim=-1)
    with_caption = decoder.sample(z, [0, 1], ["a red circle", "a blue square"], steps=3)
    assert not torch.allclose(with_caption, decoder.sample(z, [0, 1], steps=3))


def test_exports_load_and_sample_without_lightning(trained):
    """Generation reads exports with torch, diffusers and open_clip alone: Lightning is never imported."""
    root, _, _ = trained
    script = (
        "import sys\n"
        "from training.generate import UnCLIP\n"
        f"model = UnCLIP.load({str(root / 'models' / 'tiny')!r})\n"
        "images = model.text_to_image(['a red circle'], n=1, steps=2, upsampler_steps=2)\n"
        "assert images.shape == (1, 32, 32, 3), images.shape\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning', 'ray')))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_tiny_karlo_layout_decoder_with_learned_variance_trains_exports_and_samples_guided(tiny_embed, tmp_path):
    """decoder.layout karlo with a learned variance (ε + variance values, the hybrid loss): a few steps train,
    the export loads as that layout and samples with guidance (ancestral steps with the learned variance),
    seeded; a dropped z is the text projection's learned null embedding."""
    sizes = dict(
        load_decoder_config(REPO / "configs/decoder/tiny.yaml")["decoder"], layout="karlo", learned_variance=True
    )
    record = _train_tiny(
        train_decoder,
        "configs/decoder/tiny.yaml",
        tiny_embed,
        tmp_path,
        decoder=sizes,
        text_tokens="clip",
        prediction_type="epsilon",
        max_steps=6,
    )
    assert len(record.losses) == 6 and all(math.isfinite(loss) for loss in record.losses)
    decoder = load_decoder(tmp_path / "models" / "tiny" / "decoder")
    assert type(decoder.net).__name__ == "KarloDecoder" and decoder.net.unet.config.out_channels == 6
    assert decoder.net.null_embedding().abs().sum() > 0  # learned away from its zero start
    z = torch.nn.functional.normalize(torch.randn(2, decoder.config.dim), dim=-1)
    images = decoder.sample(z, [0, 1], ["a red circle", "a blue square"], steps=4, guidance_scale=3.0)
    assert images.shape == (2, 3, 8, 8) and torch.isfinite(images).all()
    again = decoder.sample(z[:1], [0], ["a red circle"], steps=4, guidance_scale=3.0)
    torch.testing.assert_close(again, images[:1], atol=1e-5, rtol=0)  # seeded, whatever the batch


def test_a_learned_variance_needs_the_karlo_layout_and_an_unclip_scheduler_prediction(tiny_clip_dir):
    from training.decoder import DecoderModule
    from training.decoder_net import Decoder, DecoderConfig

    sizes = dict(
        image_size=8, dim=32, channels=[8, 16], layers_per_block=1, head_width=8, context_width=8, norm_groups=4
    )
    with pytest.raises(ValueError, match="learned_variance needs layout: karlo"):
        Decoder(DecoderConfig(**sizes, learned_variance=True))
    with pytest.raises(ValueError, match="set prediction_type: epsilon or sample"):
        DecoderModule(dict(sizes, layout="karlo", learned_variance=True, text_token_width=32), {}, text_tokens="clip")
    with pytest.raises(ValueError, match="bound_trains_network is about the variational bound"):
        DecoderModule(
            dict(sizes, layout="karlo", text_token_width=32), {}, text_tokens="clip", bound_trains_network=True
        )


def _tiny_karlo_batch() -> dict:
    """A seeded batch of 4 rows for an 8 px decoder on 32-d CLIP vectors (the learned-variance loss tests)."""
    g = torch.Generator().manual_seed(0)
    return {
        "image": torch.rand(4, 3, 8, 8, generator=g) * 2 - 1,
        "z_i": torch.nn.functional.normalize(torch.randn(4, 32, generator=g), dim=-1),
        "z_t": torch.nn.functional.normalize(torch.randn(4, 32, generator=g), dim=-1),
        "caption": ["a red circle", "a blue square", "a star", "a green ring"],
    }


def test_the_learned_variance_loss_charges_values_outside_their_range(tiny_clip_dir, monkeypatch):
    """The decoder's hybrid loss adds variance_range_penalty: with the variance values shifted out of [-1, 1], the
    loss is the one without the penalty plus the penalty's mean, to the float (an x_0 decoder's values drift out
    of range without it, and UnCLIPScheduler, which clamps nothing, then samples speckle); values in range cost
    nothing more."""
    from training import decoder as decoder_module
    from training.conditioning import load_clip
    from training.decoder import DecoderModule
    from training.diffusion import variance_range_penalty

    clip = {"model": str(tiny_clip_dir), "checksum": load_clip({"model": str(tiny_clip_dir)}).checksum}
    sizes = dict(image_size=8, dim=32, channels=[8, 16], layers_per_block=1, head_width=8, context_width=8)
    torch.manual_seed(0)
    module = DecoderModule(
        dict(sizes, norm_groups=4, layout="karlo", learned_variance=True, text_token_width=32),
        clip,
        text_tokens="clip",
        prediction_type="sample",
    )
    batch = _tiny_karlo_batch()

    def loss_with_values(change):
        """The loss, and the variance values the loss saw, with the network's values replaced by change(values)."""
        seen = []

        def changed(net, inputs, output):
            prediction, values = output.chunk(2, dim=1)
            seen.append(change(values))
            return torch.cat([prediction, seen[-1]], dim=1)

        hook = module.net.register_forward_hook(changed)
        with torch.no_grad():
            loss = module.loss(batch, torch.Generator().manual_seed(1), module.net)
        hook.remove()
        return loss, seen[-1]

    inside, outside = (lambda v: 0.9 * torch.tanh(v)), (lambda v: v + 3.0)
    loss_in, values_in = loss_with_values(inside)
    loss_out, values_out = loss_with_values(outside)
    extra = variance_range_penalty(values_out).mean()
    assert variance_range_penalty(values_in).max() == 0 and extra > 1
    monkeypatch.setattr(decoder_module, "variance_range_penalty", lambda values: values.new_zeros(len(values)))
    unpenalised_in, _ = loss_with_values(inside)
    unpenalised_out, _ = loss_with_values(outside)
    torch.testing.assert_close(loss_in, unpenalised_in)
    torch.testing.assert_close(loss_out, unpenalised_out + extra)


def test_the_variational_bound_trains_only_the_variance_rows_unless_asked_to_train_the_network(
    tiny_clip_dir, monkeypatch
):
    """By default the bound's gradient stops at the output layer's variance rows: every other weight gets the
    gradient of the prediction's loss alone (what it gets with the bound and the penalty zeroed). With
    bound_trains_network, as Improved DDPM trains, the shared weights get the bound's gradient too."""
    from training import decoder as decoder_module
    from training.conditioning import load_clip
    from training.decoder import DecoderModule

    clip = {"model": str(tiny_clip_dir), "checksum": load_clip({"model": str(tiny_clip_dir)}).checksum}
    sizes = dict(
        image_size=8, dim=32, channels=[8, 16], layers_per_block=1, head_width=8, context_width=8, norm_groups=4
    )
    batch = _tiny_karlo_batch()

    def module(**options) -> DecoderModule:
        torch.manual_seed(0)
        return DecoderModule(
            dict(sizes, layout="karlo", learned_variance=True, text_token_width=32),
            clip,
            text_tokens="clip",
            prediction_type="sample",
            **options,
        )

    def gradients(**options) -> dict[str, torch.Tensor]:
        m = module(**options)
        m.loss(batch, torch.Generator().manual_seed(1), m.net).backward()
        return {name: p.grad.clone() for name, p in m.net.named_parameters() if p.grad is not None}

    m = module()
    inputs = m.net.example_inputs(2)
    with torch.no_grad():
        plain = m.net(*inputs)
    torch.testing.assert_close(m.net(*inputs), plain)  # the hook changes gradients, not outputs
    detached, through = gradients(), gradients(bound_trains_network=True)
    with monkeypatch.context() as patch:
        patch.setattr(decoder_module, "vlb_term", lambda *args: args[1].new_zeros(len(args[1])))
        patch.setattr(decoder_module, "variance_range_penalty", lambda values: values.new_zeros(len(values)))
        prediction_only = gradients()
    head = ("unet.conv_out.weight", "unet.conv_out.bias")
    for name, grad in prediction_only.items():
        if name in head:
            torch.testing.assert_close(detached[name][:3], grad[:3])
            torch.testing.assert_close(detached[name][3:], through[name][3:])  # the values' rows learn as before
            assert detached[name][3:].abs().sum() > 0 and grad[3:].abs().sum() == 0
        else:
            torch.testing.assert_close(detached[name], grad, msg=name)
    shared = [n for n in prediction_only if n not in head]
    assert any(not torch.allclose(through[n], prediction_only[n]) for n in shared)


def test_an_upsampler_fine_tunes_from_a_karlo_folder_and_exports(tiny_embed, tmp_path):
    """make train-upsampler with init_from Karlo's layout (a tiny random-weight pipeline saved by diffusers): the
    sizes come from its super_res_first, a few ε steps train, the export loads and samples."""
    from .diffusers_tiny import tiny_unclip_pipeline

    tiny_unclip_pipeline(tmp_path / "karlo").save_pretrained(tmp_path / "karlo" / "saved")
    record = _train_tiny(
        train_upsampler,
        "configs/decoder/upsampler-tiny.yaml",
        tiny_embed,
        tmp_path,
        upsampler={"factor": 4},
        init_from=str(tmp_path / "karlo" / "saved"),
        prediction_type="epsilon",
        max_steps=3,
    )
    assert len(record.losses) == 3 and all(math.isfinite(loss) for loss in record.losses)
    upsampler = load_upsampler(tmp_path / "models" / "tiny" / "upsampler")
    assert upsampler.net.unet.config.down_block_types[0] == "ResnetDownsampleBlock2D"
    images = upsampler.sample(torch.zeros(1, 3, 8, 8), [0], steps=2)
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()


def test_a_decoder_fine_tunes_from_a_karlo_folder_on_raw_vectors_and_exports(tiny_embed, tmp_path, monkeypatch):
    """make train-decoder with init_from Karlo's layout (a tiny random-weight pipeline saved by diffusers): the
    sizes come from its decoder/ and text_proj/, their weights (the learned null embedding too) start training,
    the batches carry raw CLIP vectors (unit × the norm columns), a few ε steps train and the export samples; a
    config size that contradicts the folder is refused by name."""
    from embeddings.config import ConfigError

    from .diffusers_tiny import tiny_unclip_pipeline

    pipeline = tiny_unclip_pipeline(tmp_path / "karlo")
    with torch.no_grad():
        pipeline.text_proj.learned_classifier_free_guidance_embeddings.normal_()
    pipeline.save_pretrained(tmp_path / "karlo" / "saved")
    import training.decoder_job as job

    built = []  # the job's data modules: a Karlo-layout decoder must be given raw vectors

    class Recording(ImageEmbeddingDataModule):
        def __init__(self, *args, **kwargs):
            built.append(kwargs.get("raw_norms"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(job, "ImageEmbeddingDataModule", Recording)
    options = dict(init_from=str(tmp_path / "karlo" / "saved"), text_tokens="clip", prediction_type="epsilon")
    record = _train_tiny(
        train_decoder, "configs/decoder/tiny.yaml", tiny_embed, tmp_path, decoder=None, max_steps=3, **options
    )
    assert len(record.losses) == 3 and all(math.isfinite(loss) for loss in record.losses)
    assert built == [True]
    config, _ = tiny_embed
    data = ImageEmbeddingDataModule(
        str(config.layout.shards), str(config.layout.embeddings), image_size=8, seed=0, val_samples=4, raw_norms=True
    )
    row = data.val_rows()[0]  # what a Karlo-layout decoder reads: unit × the norm columns
    table = store.read_shard(config.layout.embeddings / f"{store.shard_name(data.shards('val')[0].path)}.parquet")
    i = table.column("key").to_pylist().index(row["key"])
    np.testing.assert_allclose(row["image_embedding"], store.raw_vectors(table, "image_embedding")[i], rtol=1e-6)
    assert abs(np.linalg.norm(row["image_embedding"]) - 1) > 0.01
    decoder = load_decoder(tmp_path / "models" / "tiny" / "decoder")
    assert decoder.config.layout == "karlo" and decoder.config.image_size == 8
    published = pipeline.text_proj.learned_classifier_free_guidance_embeddings
    assert (
        torch.nn.functional.cosine_similarity(decoder.net.null_embedding(), published, dim=0) > 0.9
    )  # fine-tuned from it
    images = decoder.sample(8 * torch.randn(2, decoder.config.dim), [0, 1], ["a red circle", "a blue square"], steps=2)
    assert images.shape == (2, 3, 8, 8) and torch.isfinite(images).all()
    with pytest.raises(ConfigError, match="decoder.image_size is 16 but the decoder at init_from"):
        _train_tiny(
            train_decoder,
            "configs/decoder/tiny.yaml",
            tiny_embed,
            tmp_path / "again",
            decoder={"image_size": 16},
            **options,
        )
