"""Object storage: data_root as an s3:// URI, against a moto S3 server on 127.0.0.1.

The jobs run as a user runs them (python -m ...), each in a subprocess of its own session whose
environment names the endpoint and keys, as every node of a cluster would have them; the jobs' Ray
workers inherit them. Models and run outputs stay on local paths.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import tarfile

import numpy as np
import pyarrow as pa
import pytest

from embeddings import storage, store
from embeddings.tars import finished_tars, iter_tar_samples

from .conftest import REPO, kill_session, vectors_by_key

BUCKET = "unclip-test"


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on loopback with one bucket: (environment for the jobs, an s3fs client)."""
    import logging

    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not one line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "NO_PROXY": "127.0.0.1",
    }
    client = s3fs.S3FileSystem(
        key="test", secret="test", endpoint_url=env["AWS_ENDPOINT_URL"], use_listings_cache=False
    )
    client.mkdir(BUCKET)
    try:
        yield env, client
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()


@pytest.fixture
def s3_env(s3, monkeypatch):
    """The server's environment in this process too (for storage.* called here)."""
    env, client = s3
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    yield client
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


def test_storage_contract_on_object_storage(s3_env):
    client, root = s3_env, f"s3://{BUCKET}/contract"
    folder = storage.as_path(root)
    assert storage.is_uri(folder) and not storage.is_uri("data/x") and storage.listing(folder, "*.json") == []
    storage.write_bytes(folder / "a.json", b"{}")
    assert [p.name for p in storage.listing(folder, "*.json")] == ["a.json"]
    client.pipe(f"{BUCKET}/contract/b.json", b"{}")  # written by "another node": the next listing sees it
    assert [p.name for p in storage.listing(folder, "*.json")] == ["a.json", "b.json"]

    table = pa.table({"key": ["x", "y", "z"], "n": [1, 2, 3]})
    storage.write_parquet(folder / "t.parquet", table)
    assert storage.read_parquet(folder / "t.parquet", columns=["key"], filters=[("n", ">", 1)]).column(
        "key"
    ).to_pylist() == ["y", "z"]
    assert storage.parquet_file(folder / "t.parquet").metadata.num_rows == 3

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in (("k1.txt", b"a red circle"), ("k1.jpg", b"pixels")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    storage.write_bytes(folder / "00000.tar", buffer.getvalue())
    assert [(s["key"], s["caption"], s["image"]) for s in iter_tar_samples(f"{root}/00000.tar")] == [
        ("k1", "a red circle", b"pixels")
    ]
    assert [t.name for t in finished_tars(root)] == ["00000.tar"]

    with storage.local_target(folder / "blob.bin") as local:
        local.write_bytes(b"faiss bytes")
    with storage.local_copy(folder / "blob.bin") as local:
        assert local.read_bytes() == b"faiss bytes"
    with pytest.raises(RuntimeError), storage.local_target(folder / "half.bin") as local:
        local.write_bytes(b"half")
        raise RuntimeError("killed mid-write")
    assert not client.exists(f"{BUCKET}/contract/half.bin")  # a failed write leaves no object


def _run(args: list[str], env: dict) -> str:
    """python -m <args> in its own session with `env` added (its own Ray, not the session's); its output."""
    full_env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | env
    process = subprocess.Popen(
        [sys.executable, "-m", *args],
        cwd=REPO,
        env=full_env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        output, _ = process.communicate(timeout=600)
    finally:
        kill_session(process.pid)
    assert process.returncode == 0, f"python -m {' '.join(args)}\n{output[-4000:]}"
    return output


@pytest.fixture(scope="module")
def on_s3(s3, tiny_embed, tiny_clip_dir, tmp_path_factory):
    """download, embed (then one shard lost and embedded again), index, knn, curate and both trainers (the
    prior on the view) with data_root on S3: (root URI, {step: output}, local folder of models and outputs)."""
    env, client = s3
    config, _ = tiny_embed
    root, local = f"s3://{BUCKET}/data", tmp_path_factory.mktemp("s3-jobs")
    data = [
        "--config",
        "configs/data/tiny.yaml",
        "--set",
        f"data_root={root}",
        "--set",
        f"url_list={config.layout.urls}",
        "--set",
        f"embed.encoder.model={tiny_clip_dir}",
        "--set",
        "embed.encoder.precision=fp32",
        "--set",
        "embed.batch_size=32",
    ]
    out = {"download": _run(["pipelines", "download", *data], env), "embed": _run(["pipelines", "embed", *data], env)}
    out["records"] = {
        p: client.info(p)["LastModified"] for p in client.glob(f"{BUCKET}/data/tiny/embeddings/*_record.json")
    }
    client.rm([f"{BUCKET}/data/tiny/embeddings/00002.parquet", f"{BUCKET}/data/tiny/embeddings/00002_record.json"])
    out["embed again"] = _run(["pipelines", "embed", *data], env)
    out["index"] = _run(["pipelines", "index", *data], env)
    key = out["key"] = sorted(vectors_by_key(config.layout.embeddings))[0]
    out["knn"] = _run(["pipelines", "knn", *data, "--key", key, "-k", "3", "--out-dir", str(local / "knn")], env)
    training = [
        "--set",
        f"data_root={root}",
        "--set",
        f"models_root={local / 'models'}",
        "--set",
        f"outputs_root={local / 'outputs'}",
    ]
    # A view on S3 (exact duplicates only: the tiny CLIP's random weights put every image near every other).
    out["curate"] = _run(["pipelines", "curate", *data, "--view", "v", "--set", "curate.near_duplicate=null"], env)
    out["prior"] = _run(["training", "prior", "--config", "configs/prior/tiny.yaml", *training, "--set", "view=v"], env)
    out["decoder"] = _run(
        [
            "training",
            "decoder",
            "--config",
            "configs/decoder/tiny.yaml",
            *training,
            "--set",
            "max_steps=3",
            "--set",
            "val_every=3",
            "--set",
            "checkpoint_every=3",
        ],
        env,
    )
    return root, out, local


def test_download_and_embed_to_s3_equal_the_local_run(on_s3, s3_env, tiny_embed):
    root, out, _ = on_s3
    config, _ = tiny_embed
    remote = {
        s["key"]: (s["caption"], s["image"]) for t in finished_tars(f"{root}/tiny/shards") for s in iter_tar_samples(t)
    }
    here = {
        s["key"]: (s["caption"], s["image"]) for t in finished_tars(config.layout.shards) for s in iter_tar_samples(t)
    }
    assert remote == here and len(remote) > 0
    summary = json.loads(storage.as_path(f"{root}/tiny/download.json").read_text())
    assert summary["successes"] == len(remote) and summary["shards"] == len(finished_tars(config.layout.shards))
    reference, stored = vectors_by_key(config.layout.embeddings), vectors_by_key(f"{root}/tiny/embeddings")
    assert stored.keys() == reference.keys()
    assert max(np.abs(reference[k] - stored[k]).max() for k in reference) <= 1e-3  # float16 rounding
    assert store.read_manifest(f"{root}/tiny/embeddings")["complete"] is True


def test_a_lost_shard_is_embedded_again_and_only_it(on_s3, s3_env):
    root, out, _ = on_s3
    assert re.search(r"embed 1/\d+ shards", out["embed again"])
    client = s3_env
    after = {p: client.info(p)["LastModified"] for p in client.glob(f"{BUCKET}/data/tiny/embeddings/*_record.json")}
    changed = sorted(p.rsplit("/", 1)[1] for p in after if after[p] != out["records"].get(p))
    assert changed == ["00002_record.json"] and after.keys() == out["records"].keys()


def test_index_and_knn_read_from_s3(on_s3, s3_env):
    root, out, local = on_s3
    info = json.loads(storage.as_path(f"{root}/tiny/index/index.json").read_text())
    assert info["count"] == len(vectors_by_key(f"{root}/tiny/embeddings"))
    first = next(line for line in out["knn"].splitlines() if line.strip().startswith("1 "))
    assert out["key"] in first and float(first.split()[1]) > 0.99  # the key finds itself
    assert len(list((local / "knn").glob("*.html"))) == 1


def test_prior_and_decoder_train_from_s3(on_s3, s3_env):
    root, out, local = on_s3
    view = json.loads(storage.as_path(f"{root}/tiny/views/v.json").read_text())  # curated on S3, trained on
    assert f"view 'v': kept {view['kept']} of {view['rows']}" in out["curate"] and view["kept"] > 0
    assert storage.as_path(f"{root}/tiny/views/v.html").is_file()
    prior = json.loads((local / "models" / "tiny" / "prior" / "config.json").read_text())
    decoder = json.loads((local / "models" / "tiny" / "decoder" / "config.json").read_text())
    assert prior["metrics"]["step"] == 12 and decoder["metrics"]["step"] == 3
    assert re.search(r"train: \d+ samples joined by key", out["decoder"])
