"""Command line of the data jobs: `python -m pipelines JOB --config configs/data/NAME.yaml [--set key=value]`.

Jobs: data, download, ingest, embed, index, knn, export-clip-retrieval, import-clip-retrieval.
A config mistake prints `error: ...` naming it and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from embeddings import storage
from embeddings.config import ConfigError, parse_overrides

_JOBS = {
    "data": "render the synthetic source",
    "download": "download the URL list into webdataset shards",
    "embed": "CLIP-embed the shards into Parquet embedding shards",
    "index": "build faiss indices over the embedding shards",
    "knn": "nearest neighbours of a text, an image or a key",
    "export-clip-retrieval": "write the embeddings in clip-retrieval's layout",
    "import-clip-retrieval": "read a clip-retrieval folder into embedding shards",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipelines", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="job", required=True)
    for job, help_text in _JOBS.items():
        p = sub.add_parser(job, help=help_text)
        p.add_argument("--config", default="configs/data/synthetic.yaml", help="data set config (YAML)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
        if job == "knn":
            p.add_argument("--query", help="text to search for")
            p.add_argument("--image", help="image file to search with")
            p.add_argument("--key", help="a stored sample's key to search with")
            p.add_argument("-k", type=int, default=10, help="neighbours to show")
            p.add_argument("--kind", choices=("image", "text"), default="image", help="index to search")
            p.add_argument("--out-dir", default="outputs/knn", help="folder of the HTML page")
        if job == "export-clip-retrieval":
            p.add_argument("--out", help="output folder (default: data/<name>/clip_retrieval)")
        if job == "import-clip-retrieval":
            p.add_argument("--source", required=True, help="clip-retrieval folder (img_emb/, text_emb/, metadata/)")
    p = sub.add_parser("ingest", help="shard a local folder of images with caption files")
    p.add_argument("--folder", required=True, help="folder of image files, each with <stem>.txt beside it")
    p.add_argument("--name", help="data set name (default: the folder's name)")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="download option, e.g. image_size=128"
    )
    return parser


def _run(args) -> None:
    from pipelines import data_config as jobs
    from pipelines.download import format_summary

    if args.job == "ingest":
        from pipelines.ingest import ingest

        name = args.name or Path(args.folder).resolve().name
        summary = ingest(args.folder, name, **parse_overrides(args.set))
        print(format_summary(summary))
        print(f"skipped without caption file: {summary['skipped_without_caption']}")
        print(f"shards: data/{name}/shards/   summary: data/{name}/download.json")
        return

    config = jobs.load_data_config(args.config, args.set)
    layout = config.layout
    if args.job == "data":
        plan = jobs.run_data(config)
        counts = ", ".join(f"{k} {v}" for k, v in plan["splits"].items())
        print(f"rendered {plan['n_samples']} images ({counts}; {len(plan['bad'])} bad URLs planned)")
        print(f"URL list: {layout.urls}   source: {layout.source}/")
    elif args.job == "download":
        print(format_summary(jobs.run_download(config)))
        print(f"shards: {layout.shards}/   summary: {layout.download_summary}")
    elif args.job == "embed":
        manifest = jobs.run_embed(config)
        print(
            f"embedded {manifest['rows']} samples in {manifest['shards']} shards, skipped {manifest['skipped']}; "
            f"dim {manifest['dim']}, {manifest['dtype']}, computed in {manifest['encoder']['compute_dtype']}"
        )
        print(f"embeddings: {layout.embeddings}/   manifest: {layout.embeddings / '_manifest.json'}")
    elif args.job == "index":
        info = jobs.run_index(config)
        for kind, entry in info["indices"].items():
            print(
                f"{kind:>5}: {entry['factory']:<16} {info['count']} vectors, recall@10 vs exact {entry['recall_at_10']:.3f}"
            )
        print(f"index: {layout.index}/   summary: {layout.index / 'index.json'}")
    elif args.job == "knn":
        from embeddings.knn import format_table, knn

        rows, page = knn(
            layout, query=args.query, image=args.image, key=args.key, k=args.k, kind=args.kind, out_dir=args.out_dir
        )
        print(format_table(rows))
        print(f"page: {page}")
    elif args.job == "export-clip-retrieval":
        from pipelines.clip_retrieval import export_clip_retrieval

        out = storage.as_path(args.out) if args.out else layout.root / "clip_retrieval"
        counts = export_clip_retrieval(layout.embeddings, out)
        print(f"exported {counts['rows']} rows in {counts['shards']} parts to {out}/ (img_emb/, text_emb/, metadata/)")
    elif args.job == "import-clip-retrieval":
        from pipelines.clip_retrieval import import_clip_retrieval

        manifest = import_clip_retrieval(args.source, layout.embeddings, encoder=(config.embed.get("encoder") or None))
        print(f"imported {manifest['rows']} rows in {manifest['shards']} shards into {layout.embeddings}/")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        _run(args)
    except (ConfigError, FileNotFoundError, KeyError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
