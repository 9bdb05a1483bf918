"""Cluster jobs on one machine: a Ray cluster of several nodes runs download and embed (tests/cluster_run.py).

The cluster runs in a subprocess of its own session, so no Ray process of it can outlive the test.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from embeddings import store
from embeddings.tars import iter_tar_samples

from .conftest import REPO, kill_session, session_processes, vectors_by_key


@pytest.fixture(scope="module")
def cluster_run(tiny_embed, tiny_clip_dir, tmp_path_factory):
    """Run every cluster phase once: (report, its output folder, its stdout, processes left after it exited)."""
    out = tmp_path_factory.mktemp("cluster")
    process = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "cluster_run.py"), str(out), str(tiny_clip_dir)],
        cwd=REPO,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        output, _ = process.communicate(timeout=900)
        deadline = time.time() + 10  # processes the cluster's shutdown signalled may take a moment to exit
        while (left := session_processes(process.pid)) and time.time() < deadline:
            time.sleep(0.2)
        left = [_cmdline(pid) for pid in left]  # what was left, for the assertion's message
    finally:
        kill_session(process.pid)
        process.wait()
    text = output.decode(errors="replace")
    assert process.returncode == 0, text[-4000:]
    return json.loads((out / "report.json").read_text()), out, text, left


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return f"{pid} (exited)"


def tar_contents(shards_dir) -> dict[str, tuple[str, bytes]]:
    """key → (caption, image bytes) over every tar of a folder, refusing a duplicate key."""
    contents = {}
    for tar in sorted(shards_dir.glob("*.tar")):
        for sample in iter_tar_samples(tar):
            assert sample["key"] not in contents, f"duplicate key {sample['key']}"
            contents[sample["key"]] = (sample["caption"], sample["image"])
    return contents


def test_download_and_embed_spread_over_two_nodes_equal_a_local_run(cluster_run, tiny_embed):
    report, out, _, _ = cluster_run
    local, _ = tiny_embed
    both = out / "both" / local.name
    nodes = set(report["nodes"].values())
    assert set(report["both"]["download_nodes"]) == nodes and set(report["both"]["embed_nodes"]) == nodes
    assert tar_contents(both / "shards") == tar_contents(local.layout.shards)
    reference, clustered = vectors_by_key(local.layout.embeddings), vectors_by_key(both / "embeddings")
    assert clustered.keys() == reference.keys()
    assert max(np.abs(reference[k] - clustered[k]).max() for k in reference) <= 1e-3  # float16 rounding


def test_the_near_duplicate_search_spreads_over_both_nodes_and_finds_what_one_process_finds(cluster_run):
    """make curate on a cluster (distribute): the clusters' searches ran as Ray tasks on both nodes, and the view
    equals the one the search in the driver alone writes, row for row."""
    report, out, _, _ = cluster_run
    assert "8 clusters in 8 Ray tasks on 2 node(s)" in report["both"]["curate_output"]
    assert report["both"]["curate"]["dropped"].get("near_duplicate", 0) > 0
    views = out / "both" / "tiny" / "views"
    spread, here = (pq.read_table(views / f"{name}.parquet") for name in ("spread", "here"))
    assert spread.equals(here)


def test_a_node_lost_mid_job_leaves_the_survivors_to_finish(cluster_run):
    report, out, output, _ = cluster_run
    lost = report["lost"]
    assert lost["download_node_removed_while_busy"] and lost["embed_node_removed_while_busy"]
    lost_shards = re.findall(r"lost the actor embedding (\d+)\.tar", output)
    assert lost_shards  # the shard the removed node was embedding went to another actor...
    download = lost["download"]
    assert download["shards"] == 8 and download["count"] == 1200
    assert download["successes"] == 1200 - round(0.02 * 1200)  # every good URL, once: only the planned bad ones fail
    tars = tar_contents(out / "lost" / "tiny" / "shards")
    assert len(tars) == download["successes"]
    table = store.read_table(out / "lost" / "tiny" / "embeddings", columns=["key", "image_embedding"])
    keys = table.column("key").to_pylist()
    assert len(keys) == len(set(keys)) and set(keys) == set(tars)
    norms = np.linalg.norm(store.arrow_to_vectors(table.column("image_embedding")), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=2e-3)
    for shard in lost_shards:  # ...and was written there (shards it had finished before may stay its own)
        assert lost["embed_nodes"][shard] != lost["removed_node"]


def test_ray_job_submit_runs_the_embed_job_on_the_head(cluster_run):
    report, out, _, _ = cluster_run
    assert report["submit"]["returncode"] == 0, report["submit"]["output"]
    assert "succeeded" in report["submit"]["output"]
    submitted, direct = (
        vectors_by_key(out / "submit" / "tiny" / "embeddings"),
        vectors_by_key(out / "both" / "tiny" / "embeddings"),
    )
    assert submitted.keys() == direct.keys()
    assert max(np.abs(direct[k] - submitted[k]).max() for k in direct) <= 1e-3


def test_the_cluster_leaves_no_process_behind(cluster_run):
    *_, left = cluster_run
    assert left == []


@pytest.mark.parametrize("name", ["local", "aws-gpu"])
def test_cluster_launcher_configs_pass_rays_schema(name):
    import yaml
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO / "configs" / "cluster" / f"{name}.yaml").read_text())
    validate_config(prepare_config(config))
    assert any("make setup" in c for c in config["setup_commands"])


def test_kuberay_config_matches_the_pinned_ray_and_mounts_shared_storage():
    import ray
    import yaml

    cluster = yaml.safe_load((REPO / "configs" / "cluster" / "kuberay.yaml").read_text())
    assert cluster["kind"] == "RayCluster" and cluster["spec"]["rayVersion"] == ray.__version__
    groups = [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]
    for group in groups:
        (container,) = group["template"]["spec"]["containers"]
        assert {"name": "shared", "mountPath": "/mnt/shared"} in container["volumeMounts"]


def test_an_unknown_launcher_is_a_clear_error():
    from embeddings.config import ConfigError
    from training.launch import run_job

    with pytest.raises(ConfigError, match="launcher 'slurm'"):
        run_job(lambda **_: {}, {"launcher": "slurm"})
