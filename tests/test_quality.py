"""Quality floors of the trained defaults (make test-all): looser than the targets, so regressions show."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embeddings.encoders import load_encoder
from pipelines import shapes
from training.clip_eval import evaluate_clip

from .conftest import REPO

pytestmark = pytest.mark.slow


def test_committed_default_clip_knows_colour_and_shape():
    """Zero-shot on 600 freshly rendered val-like scenes (seed unseen in training); targets 95% / 85%."""
    folder = REPO / "models" / "synthetic" / "clip"
    encoder = load_encoder({"model": str(folder)})
    rng = np.random.default_rng(12345)
    rows, images, captions = [], [], []
    for i in range(600):
        scene = shapes.sample_scene(rng, n_objects=1)
        obj = scene.objects[0]
        rows.append({"n_objects": 1, "colour": obj.colour, "shape": obj.shape})
        images.append(encoder.preprocess(shapes.render(scene, 64)))
        captions.append(shapes.caption(scene, shapes.choose_named(scene, rng), rng))
    image_z = torch.cat([encoder.encode_images(torch.stack(images[i : i + 200])) for i in range(0, 600, 200)]).numpy()
    text_z = encoder.encode_texts(captions).numpy()
    metrics = evaluate_clip(image_z, text_z, rows, lambda t: encoder.encode_texts(t).numpy(), pairs=600)
    assert metrics["colour_accuracy"] >= 0.90, metrics
    assert metrics["shape_accuracy"] >= 0.75, metrics
    assert metrics["paired_cosine"] > metrics["random_pair_cosine"] + 0.2, metrics
