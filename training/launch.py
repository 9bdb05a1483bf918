"""How a training job runs on several devices and nodes: Lightning's own launch, or Ray Train.

`launcher: lightning` (the default): this process is the job. On one machine Lightning starts one
process per device itself (`strategy: ddp`); under SLURM (`srun`) or `torchrun` those start every
process and Lightning reads the rank from their environment. `num_nodes` and `devices` come from
the config either way.

`launcher: ray`: this process is a driver. It joins the Ray cluster at RAY_ADDRESS (else starts a
local Ray) and Ray Train's TorchTrainer starts `num_nodes × devices` workers (one GPU each when the
accelerator is a GPU), each running the very same job function with Ray's DDP strategy and cluster
environment. The streaming datamodules take rank and world size from torch.distributed, so the
split, equal-batch and resume guarantees do not depend on the launcher. Paths in the config
(data_root, models_root, outputs_root) are made absolute here: on a cluster they must name storage
that every node shares.
"""

from __future__ import annotations

import functools
import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path

from embeddings import storage
from embeddings.config import STORAGE_KEYS, ConfigError

LAUNCHERS = ("lightning", "ray")


def run_job(job: Callable[..., dict], config: dict) -> dict:
    """Run the training job `job(**config)` with the launcher of its resolved config (defaults filled in);
    returns rank 0's result."""
    launcher = config["launcher"]
    if launcher not in LAUNCHERS:
        raise ConfigError(f"launcher {launcher!r}: use one of {', '.join(LAUNCHERS)}")
    if launcher == "lightning" or config.get("dry_run"):  # a dry run starts no worker: it only estimates
        return job(**config)
    return ray_train(job, config)


def absolute_paths(config: dict) -> dict:
    """The resolved config with its storage paths made absolute (the data set's data_root filled in from
    its config; an object-storage URI stays as it is)."""
    from pipelines.data_config import load_data_config

    config = dict(config)
    if not config.get("data_root") and config.get("data"):
        config["data_root"] = load_data_config(config["data"]).data_root
    for key in STORAGE_KEYS:
        value = config.get(key)
        if value and not storage.is_uri(value):
            config[key] = str(Path(value).resolve())
    return config


def ray_train(job: Callable[..., dict], config: dict) -> dict:
    """Run `job` on Ray Train workers: num_nodes × devices of them, with a GPU each when the accelerator is one."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines.cluster import ray_session

    config = absolute_paths(config)
    workers = int(config["num_nodes"]) * int(config["devices"])
    result_file = Path(config["outputs_root"]) / f".ray-train-result-{uuid.uuid4().hex}.json"
    with ray_session():
        accelerator = config["accelerator"]
        use_gpu = accelerator in ("gpu", "cuda") or (
            accelerator == "auto" and ray.cluster_resources().get("GPU", 0) > 0
        )
        trainer = TorchTrainer(
            functools.partial(_worker, job, str(result_file), os.getcwd()),
            train_loop_config=config,
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu),
            run_config=RunConfig(
                name=f"{job.__name__}-{uuid.uuid4().hex[:8]}",
                storage_path=str(Path(config["outputs_root"]) / "ray-train"),
            ),
        )
        trainer.fit()
    try:
        return json.loads(result_file.read_text())
    finally:
        result_file.unlink(missing_ok=True)


def _worker(job: Callable[..., dict], result_file: str, driver_cwd: str, config: dict) -> None:
    """One Ray Train worker: the job itself, in the driver's folder where this node has it (relative config paths)."""
    import ray.train

    if Path(driver_cwd).is_dir():
        os.chdir(driver_cwd)
    result = job(**config)
    if ray.train.get_context().get_world_rank() == 0:
        Path(result_file).write_text(json.dumps(result))
