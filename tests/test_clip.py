"""train-clip: the tiny config learns, resumes where it stopped, and its export is what embed loads."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from embeddings.encoders import load_encoder
from training.clip import ClipModule, load_clip_config, train_clip
from training.data import decode_image, read_tar_range, tar_shards

from .conftest import REPO


def _losses(run_dir):
    with open(run_dir / "logs" / "metrics.csv") as f:
        return [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]


@pytest.fixture(scope="module")
def tiny_clip_run(tiny_download, tmp_path_factory):
    config, _, _ = tiny_download
    root = tmp_path_factory.mktemp("clip")
    settings = load_clip_config(REPO / "configs/clip/tiny.yaml", ["max_steps=24", "checkpoint_every=8", "val_every=12"])
    common = dict(data_root=config.data_root, precision="32")
    metrics = train_clip(
        **dict(settings, **common, models_root=str(root / "models"), outputs_root=str(root / "outputs"))
    )
    return config, settings, root, metrics


def test_tiny_clip_loss_falls_and_metrics_are_written(tiny_clip_run):
    _, _, root, metrics = tiny_clip_run
    run_dir = root / "outputs" / "train-clip-tiny"
    losses = _losses(run_dir)
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    assert metrics["step"] == 24 and {"colour_accuracy", "shape_accuracy", "recall_at_10"} <= set(metrics)
    assert json.loads((run_dir / "metrics.json").read_text()) == pytest.approx(metrics)
    assert (run_dir / "checkpoints" / "last.ckpt").exists()


def test_export_loads_through_the_embed_loader_with_the_same_embeddings(tiny_clip_run):
    config, settings, root, _ = tiny_clip_run
    export = root / "models" / "tiny" / "clip"
    encoder = load_encoder({"model": str(export), "precision": "fp32"})
    module = ClipModule.load_from_checkpoint(root / "outputs" / "train-clip-tiny" / "checkpoints" / "last.ckpt")
    module.eval()
    shard = tar_shards(config.layout.shards, "val")[0]
    samples = list(read_tar_range(shard, 0, 8))
    pixels = torch.stack([encoder.preprocess(decode_image(s["image"])) for s in samples])
    captions = [s["caption"] for s in samples]
    with torch.no_grad():
        expected_i = torch.nn.functional.normalize(module.model.encode_image(pixels), dim=-1)
        expected_t = torch.tensor(module.encode_texts(captions))
    assert torch.allclose(encoder.encode_images(pixels), expected_i, atol=1e-5)
    assert torch.allclose(encoder.encode_texts(captions), expected_t, atol=1e-5)


def test_resume_from_the_middle_reaches_the_same_weights(tiny_clip_run, tmp_path):
    """Resumed from its step-8 checkpoint (mid-epoch), a second run reaches step 24 with the weights of the run that
    was never stopped: the same batches, in the same order, through the same optimizer state."""
    config, settings, root, _ = tiny_clip_run
    checkpoints = root / "outputs" / "train-clip-tiny" / "checkpoints"
    mid = torch.load(checkpoints / "step000008.ckpt", weights_only=True, map_location="cpu")
    assert mid["global_step"] == 8 and mid["data_position"] == {"epoch": 0, "batches": 8}
    metrics = train_clip(
        **dict(
            settings,
            data_root=config.data_root,
            models_root=str(tmp_path / "models"),
            outputs_root=str(tmp_path / "outputs"),
            precision="32",
            resume=str(checkpoints / "step000008.ckpt"),
        )
    )
    assert metrics["step"] == 24
    whole = torch.load(checkpoints / "last.ckpt", weights_only=True, map_location="cpu")["state_dict"]
    resumed = torch.load(tmp_path / "outputs" / "train-clip-tiny" / "checkpoints" / "last.ckpt", weights_only=True)
    assert whole.keys() == resumed["state_dict"].keys()
    for name, value in whole.items():
        torch.testing.assert_close(resumed["state_dict"][name], value, atol=1e-5, rtol=1e-4, msg=name)
