"""Ray connection for the pipeline jobs: the cluster named by RAY_ADDRESS, else a local Ray."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[None]:
    """Use the running Ray if there is one; else join `address` (or RAY_ADDRESS); else start a local one.

    A Ray that this block started is shut down when it ends, so a job leaves no process behind.
    """
    import ray

    # albumentations (used by img2dataset) asks PyPI for updates at import: keep jobs offline.
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    if ray.is_initialized():
        yield
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, runtime_env={"env_vars": {"NO_ALBUMENTATIONS_UPDATE": "1"}})
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False)
    try:
        yield
    finally:
        ray.shutdown()
