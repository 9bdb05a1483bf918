"""Command line of the data jobs: `python -m pipelines {data,download,ingest} --config ...`."""

from __future__ import annotations

import argparse
import sys

from embeddings.config import ConfigError, parse_overrides


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines", description=__doc__)
    sub = parser.add_subparsers(dest="job", required=True)
    for job, help_text in (("data", "render the synthetic source"), ("download", "download the URL list into shards")):
        p = sub.add_parser(job, help=help_text)
        p.add_argument("--config", default="configs/data/synthetic.yaml", help="data set config (YAML)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p = sub.add_parser("ingest", help="shard a local folder of images with caption files")
    p.add_argument("--folder", required=True, help="folder of image files, each with <stem>.txt beside it")
    p.add_argument("--name", help="data set name (default: the folder's name)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="download option, e.g. image_size=128")
    args = parser.parse_args(argv)

    try:
        if args.job == "ingest":
            from pathlib import Path

            from pipelines.download import format_summary
            from pipelines.ingest import ingest

            name = args.name or Path(args.folder).resolve().name
            summary = ingest(args.folder, name, **parse_overrides(args.set))
            print(format_summary(summary))
            print(f"skipped without caption file: {summary['skipped_without_caption']}")
            print(f"shards: data/{name}/shards/   summary: data/{name}/download.json")
            return 0

        from pipelines.data_config import load_data_config, run_data, run_download

        config = load_data_config(args.config, args.set)
        if args.job == "data":
            plan = run_data(config)
            counts = ", ".join(f"{k} {v}" for k, v in plan["splits"].items())
            print(f"rendered {plan['n_samples']} images ({counts}; {len(plan['bad'])} bad URLs planned)")
            print(f"URL list: {config.layout.urls}   source: {config.layout.source}/")
        else:
            from pipelines.download import format_summary

            summary = run_download(config)
            print(format_summary(summary))
            print(f"shards: {config.layout.shards}/   summary: {config.layout.download_summary}")
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
