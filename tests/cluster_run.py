"""A Ray cluster of several nodes on this machine, running the data jobs, for tests/test_cluster.py.

    python tests/cluster_run.py OUT_DIR CLIP_DIR

Starts a head and a worker node with ray.cluster_utils (one CPU each, the
head with the dashboard's job server), then:
  1. `both`: data → download → embed of the tiny data set, shards spread over both nodes, then `make curate`'s
     near-duplicate search as Ray tasks over both nodes (view `spread`) and in the driver alone (view `here`);
  2. `submit`: `make submit JOB=embed` (ray job submit) to the head's job server, over `both`'s shards copied;
  3. `lost`: the same with a larger data set, each job losing a node while it runs a shard there.
Writes OUT_DIR/report.json; shuts the cluster down whatever happens, so no process is left.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from pipelines.data_config import (  # noqa: E402
    load_data_config,
    run_curate,
    run_data,
    run_download,
    run_embed,
)


def node_args(**extra) -> dict:
    """One CPU, a small object store, and free ports for the node's agents: the defaults (e.g. the dashboard
    agent's 52365) are taken by any other Ray on this machine, such as the test session's own."""
    return dict(
        num_cpus=1,
        object_store_memory=80 * 2**20,
        dashboard_agent_listen_port=free_port(),
        metrics_export_port=free_port(),
        **extra,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def busy_children(parent: int, title: str) -> bool:
    """Whether a process under `parent` (a node's raylet) runs `title` now (Ray sets ray::<task> as its title)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent and cmdline.startswith(f"ray::{title}"):
            return True
    return False


def remove_when_busy(cluster: Cluster, node, title: str, after: float = 0.0, timeout: float = 300) -> threading.Thread:
    """A thread that removes `node` from the cluster as soon as it runs `title` (after `after` seconds)."""
    raylet = node.all_processes["raylet"][0].process.pid
    outcome: dict = {"removed_while_busy": False}

    def watch() -> None:
        time.sleep(after)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if busy_children(raylet, title):
                cluster.remove_node(node, allow_graceful=False)
                outcome["removed_while_busy"] = True
                return
            time.sleep(0.02)

    thread = threading.Thread(target=watch, daemon=True)
    thread.outcome = outcome
    thread.start()
    return thread


def node_of_tasks(name: str) -> list[str]:
    """Node ids of the finished attempts of task `name`, from the state API."""
    from ray.util.state import list_tasks

    tasks = list_tasks(
        filters=[("name", "=", name), ("state", "=", "FINISHED")], limit=10_000, raise_on_missing_output=False
    )
    return sorted(t.node_id for t in tasks if t.node_id)


def main() -> None:
    out, clip = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()
    report: dict = {}
    base = load_data_config(REPO / "configs/data/tiny.yaml")
    dashboard = free_port()
    cluster = Cluster(initialize_head=True, head_node_args=node_args(include_dashboard=True, dashboard_port=dashboard))
    try:
        worker = cluster.add_node(**node_args())
        ray.init(address=cluster.address, log_to_driver=False)
        report["nodes"] = {"head": cluster.head_node.node_id, "worker": worker.node_id}

        # 1. Both nodes share the work.
        config = replace(
            base,
            data_root=str(out / "both"),
            embed={"encoder": {"model": str(clip), "precision": "fp32"}, "batch_size": 32},
        )  # fp32 as the tiny_embed fixture's, which these runs are compared with
        run_data(config)
        report["both"] = {"download": run_download(config), "download_nodes": node_of_tasks("ray_download")}
        manifest = run_embed(config)
        report["both"]["embed_nodes"] = sorted(r["node"] for r in manifest["records"].values())
        curate = {"clusters": 8, "search_breadth": 2}
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            report["both"]["curate"] = run_curate(replace(config, curate={**curate, "distribute": True}), "spread")
        run_curate(replace(config, curate={**curate, "distribute": False}), "here")
        report["both"]["curate_output"] = printed.getvalue()

        # 2. A batch job through the head's job server, with the working directory uploaded.
        submit = out / "submit" / base.name
        shutil.copytree(out / "both" / base.name / "shards", submit / "shards")
        # `make submit`, as a user runs it; the job's Python is this one (a cluster's own image has its own).
        command = [
            "make",
            "--no-print-directory",
            "submit",
            "JOB=embed",
            f"RAY_ADDRESS=http://127.0.0.1:{dashboard}",
            "CONFIG=configs/data/tiny.yaml",
            f"SUBMIT_PYTHON={sys.executable}",
            f"SET=data_root={out / 'submit'} embed.encoder.model={clip} embed.encoder.precision=fp32 embed.batch_size=32",
        ]
        for _ in range(3):  # the job server answers 'No available agent' until the head's agent has registered
            job = subprocess.run(command, capture_output=True, text=True, timeout=400, cwd=REPO)
            if "No available agent" not in job.stdout + job.stderr:
                break
            time.sleep(5)
        report["submit"] = {"returncode": job.returncode, "output": (job.stdout + job.stderr)[-4000:]}

        # 3. Each job loses a node mid-shard; the survivors finish it.
        synthetic = {**base.synthetic, "n_samples": 1200, "val_samples": 150, "heldout_samples": 150}
        config = replace(
            config,
            data_root=str(out / "lost"),
            samples_per_shard=150,
            synthetic=synthetic,
            embed={**config.embed, "batch_size": 8, "decode_threads": 1},
        )
        run_data(config)
        doomed = cluster.add_node(**node_args())
        watcher = remove_when_busy(cluster, doomed, "ray_download")
        report["lost"] = {"download": run_download(config)}
        watcher.join(timeout=5)
        report["lost"]["download_node_removed_while_busy"] = watcher.outcome["removed_while_busy"]
        doomed = cluster.add_node(**node_args())
        # Removed while its actor runs a shard (not while it loads the encoder), so that shard must move.
        watcher = remove_when_busy(cluster, doomed, "ShardEmbedder.process", after=1.0)
        manifest = run_embed(config)
        watcher.join(timeout=5)
        report["lost"]["embed_node_removed_while_busy"] = watcher.outcome["removed_while_busy"]
        report["lost"]["embed_nodes"] = {shard: r["node"] for shard, r in manifest["records"].items()}
        report["lost"]["removed_node"] = doomed.node_id
    finally:
        ray.shutdown()
        cluster.shutdown()
    (out / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
