"""Shared fixtures: one local Ray for the session, and the tiny synthetic data set built once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no update check over the network


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for every test that asks for it; shut down when the session ends."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_config():
    from pipelines.data_config import load_data_config

    return load_data_config(REPO / "configs/data/tiny.yaml")


@pytest.fixture(scope="session")
def tiny_source(tmp_path_factory, tiny_config):
    """The tiny synthetic source rendered once: (config, plan) with data_root in a temp folder."""
    from dataclasses import replace

    from pipelines.data_config import run_data

    config = replace(tiny_config, data_root=str(tmp_path_factory.mktemp("data")))
    return config, run_data(config)


@pytest.fixture(scope="session")
def tiny_download(tiny_source, ray_local):
    """The tiny source downloaded once through Ray: (config, plan, summary)."""
    from pipelines.data_config import run_download

    config, plan = tiny_source
    return config, plan, run_download(config)
