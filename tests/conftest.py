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


TINY_CLIP = dict(
    embed_dim=32,
    vision_cfg=dict(image_size=32, layers=2, width=64, patch_size=8, head_width=32),
    text_cfg=dict(
        context_length=32, vocab_size=49408, width=32, heads=2, layers=2
    ),  # text width = dim, as a PriorTransformer needs
)


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    """A tiny open_clip ViT with random weights, exported in open_clip's folder layout."""
    import open_clip
    import torch

    from embeddings.encoders import save_clip_folder

    torch.manual_seed(0)
    model = open_clip.model.CLIP(**TINY_CLIP)
    return save_clip_folder(model, TINY_CLIP, tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="session")
def tiny_embed(tiny_download, tiny_clip_dir):
    """The tiny download embedded once with the tiny CLIP: (config, manifest)."""
    from dataclasses import replace

    from pipelines.data_config import run_embed

    config, _, _ = tiny_download
    # fp32 whatever the machine: tests compare these vectors with other runs', and where bf16 is only ~2×
    # fp32 (AVX512-BF16) precision auto can choose differently in two processes (the tiny CLIP's bf16 and
    # fp32 vectors differ by ~5e-3).
    encoder = {"model": str(tiny_clip_dir), "precision": "fp32"}
    config = replace(config, embed={"encoder": encoder, "batch_size": 32})
    return config, run_embed(config)


def session_processes(sid: int) -> list[int]:
    """Pids of the live (not zombie) processes of session `sid`."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
                if os.getsid(int(entry)) == sid and state != "Z":
                    pids.append(int(entry))
            except (OSError, ProcessLookupError):
                pass
    return pids


def kill_session(sid: int) -> None:
    """SIGKILL every process of a session (a killed job's driver, its Ray, its workers)."""
    import signal

    for pid in session_processes(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def vectors_by_key(folder, column: str = "image_embedding") -> dict:
    """key → stored vector (float32) of an embedding folder."""
    from embeddings import store

    table = store.read_table(folder, columns=["key", column])
    return dict(zip(table.column("key").to_pylist(), store.arrow_to_vectors(table.column(column))))


def opt_out_view(layout, view: str, keys, folder) -> None:
    """Curate `layout`'s data into `view` with `keys` opted out and nothing else dropped but byte-identical
    copies (the tiny CLIP's random weights put every image near every other: no near-duplicate search)."""
    from pipelines.curate import curate

    (folder / f"{view}-keys.txt").write_text("\n".join(sorted(keys)))
    curate(layout.embeddings, layout.views, view, near_duplicate=None, opt_out_keys=str(folder / f"{view}-keys.txt"))
