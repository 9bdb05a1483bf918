"""Images per second of `make data` + `make download` on a fresh copy of a data set.

    python bench/download.py [--config configs/data/synthetic.yaml] [--keep]

Renders the config's synthetic source (or uses its URL list) under a temporary data root, downloads
it through img2dataset on a local Ray, and prints the render and download rates. Ray start-up is
timed separately from the download, so the figure is comparable with img2dataset's own log.
Results are appended to bench/results/download.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from pipelines.data_config import DEFAULT_DATA, load_data_config, run_data, run_download  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=DEFAULT_DATA, help="the data set: a name or a config path")
    parser.add_argument("--keep", action="store_true", help="keep the temporary data root")
    args = parser.parse_args()

    import ray

    root = Path(tempfile.mkdtemp(prefix="unclip-bench-"))
    config = replace(load_data_config(args.config), data_root=str(root))
    result = {"config": args.config, "cpus": os.cpu_count()}
    if config.synthetic is not None:
        start = time.time()
        plan = run_data(config)
        result["render_images_per_s"] = round(plan["n_samples"] / (time.time() - start), 1)
    start = time.time()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    result["ray_start_s"] = round(time.time() - start, 2)
    start = time.time()
    summary = run_download(config)
    elapsed = time.time() - start
    ray.shutdown()
    result.update(
        urls=summary["count"],
        successes=summary["successes"],
        download_s=round(elapsed, 2),
        download_urls_per_s=round(summary["count"] / elapsed, 1),
    )
    print(json.dumps(result, indent=1))
    out = Path(__file__).parent / "results" / "download.json"
    out.parent.mkdir(exist_ok=True)
    history = json.loads(out.read_text()) if out.exists() else []
    out.write_text(json.dumps(history + [result], indent=1) + "\n")
    if not args.keep:
        import shutil

        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
