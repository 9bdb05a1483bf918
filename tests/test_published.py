"""The published unCLIP layouts that diffusers loads (Karlo's UnCLIPPipeline, Kandinsky 2.2's prior
pipeline), exercised offline through tiny random-weight instances (tests/diffusers_tiny.py)."""

from __future__ import annotations

import json

import numpy as np
import torch

from .diffusers_tiny import tiny_kandinsky_prior_pipeline, tiny_unclip_pipeline

# diffusers 0.42.1 saves the text projection of UnCLIPPipeline as ["diffusers", "UnCLIPTextProjModel"],
# which it cannot load back (the class lives in diffusers.pipelines.deprecated.unclip); Karlo's own
# folders say ["unclip", ...], which 0.42.1 refuses to import. The module that defines the class loads.
TEXT_PROJ = ["diffusers.pipelines.deprecated.unclip.text_proj", "UnCLIPTextProjModel"]


def test_the_pinned_transformers_runs_diffusers_unclip_and_kandinsky_pipelines_offline(tmp_path):
    from diffusers import KandinskyV22PriorPipeline
    from diffusers.pipelines.deprecated.unclip import UnCLIPPipeline

    steps = dict(prior_num_inference_steps=2, decoder_num_inference_steps=2, super_res_num_inference_steps=2)
    pipeline = tiny_unclip_pipeline(tmp_path / "karlo")
    images = pipeline("a red circle", generator=torch.Generator().manual_seed(0), output_type="np", **steps).images
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all() and images.std() > 0
    pipeline.save_pretrained(tmp_path / "karlo" / "saved")
    index = json.loads((tmp_path / "karlo" / "saved" / "model_index.json").read_text())
    assert index["text_proj"] == ["diffusers", "UnCLIPTextProjModel"]  # what 0.42.1 writes, and cannot read
    index["text_proj"] = TEXT_PROJ
    (tmp_path / "karlo" / "saved" / "model_index.json").write_text(json.dumps(index))
    loaded = UnCLIPPipeline.from_pretrained(tmp_path / "karlo" / "saved")
    again = loaded("a red circle", generator=torch.Generator().manual_seed(0), output_type="np", **steps).images
    np.testing.assert_allclose(again, images, atol=1e-5)

    prior = tiny_kandinsky_prior_pipeline(tmp_path / "kandinsky")
    embeds = prior("a blue square", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).image_embeds
    prior.save_pretrained(tmp_path / "kandinsky" / "saved")
    loaded = KandinskyV22PriorPipeline.from_pretrained(tmp_path / "kandinsky" / "saved")
    again = loaded("a blue square", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).image_embeds
    assert embeds.shape == (1, 32) and torch.allclose(again, embeds, atol=1e-6)
