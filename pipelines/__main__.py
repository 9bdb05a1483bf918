"""Command line of the data jobs: `python -m pipelines JOB --config NAME_OR_PATH [--set key=value]`.

Jobs: data, download, ingest, embed, reset-embeddings, index, curate, knn, export-clip-retrieval,
import-clip-retrieval. `--config` takes a data config's path or a data set's name (configs/data/NAME.yaml,
else data/NAME/data.yaml). A config mistake prints `error: ...` naming it and exits with status 2; an
embed job that met damaged shards finishes the others, names them with the command that repairs
them, and exits with status 1.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from embeddings import storage
from embeddings.config import ConfigError, parse_overrides
from pipelines.data_config import DEFAULT_DATA

_JOBS = {
    "data": "render the synthetic source",
    "download": "download the URL list into webdataset shards",
    "embed": "CLIP-embed the shards into Parquet embedding shards",
    "reset-embeddings": "remove the embeddings and indices, to embed again with another CLIP",
    "index": "build faiss indices over the embedding shards",
    "curate": "write a view: the keys to train on, with a reason for every dropped one",
    "knn": "nearest neighbours of a text, an image or a key",
    "export-clip-retrieval": "write the embeddings in clip-retrieval's layout",
    "import-clip-retrieval": "read a clip-retrieval folder into embedding shards",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipelines", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="job", required=True)
    for job, help_text in _JOBS.items():
        p = sub.add_parser(job, help=help_text)
        p.add_argument("--config", default=DEFAULT_DATA, help="data set: a config's path or a data set's name")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
        if job == "download":
            p.add_argument("--url-list", help="a new URL list: writes data/NAME/data.yaml for it (with --name)")
            p.add_argument("--name", help="the new data set's name (with --url-list)")
        if job in ("download", "embed"):
            p.add_argument("--redo", default="", help="shards to do again, e.g. 00003,00017 (their files removed)")
        if job == "embed":
            p.add_argument("--clip", help="the CLIP: an open_clip folder, ARCH:WEIGHTS_FILE or ARCH:PRETRAINED_TAG")
        if job == "knn":
            p.add_argument("--query", help="text to search for")
            p.add_argument("--image", help="image file to search with")
            p.add_argument("--key", help="a stored sample's key to search with")
            p.add_argument("-k", type=int, default=10, help="neighbours to show")
            p.add_argument("--kind", choices=("image", "text"), default="image", help="index to search")
            p.add_argument("--out-dir", default="outputs/knn", help="folder of the HTML page")
        if job == "curate":
            p.add_argument("--view", required=True, help="the view's name: data/<name>/views/<view>.parquet")
        if job == "export-clip-retrieval":
            p.add_argument("--out", help="output folder (default: data/<name>/clip_retrieval)")
        if job == "import-clip-retrieval":
            p.add_argument("--source", required=True, help="clip-retrieval folder (img_emb/, text_emb/, metadata/)")
    p = sub.add_parser("ingest", help="shard a local folder of images with caption files")
    p.add_argument("--folder", required=True, help="folder of image files, each with <stem>.txt beside it")
    p.add_argument("--name", help="data set name (default: the folder's name)")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="data config key, e.g. download.image_size=128"
    )
    return parser


def make_arguments(args) -> str:
    """How make is told the data set and settings of this run: NAME=x or CONFIG=path, and SET=."""
    from pipelines.data_config import is_config_path

    data = f"CONFIG={shlex.quote(args.config)}" if is_config_path(args.config) else f"NAME={args.config}"
    return data + (f" SET={shlex.quote(' '.join(args.set))}" if args.set else "")


def next_steps(name: str) -> str:
    """The commands that take a new data set from shards to samples (the README's own-data block)."""
    return "\n".join(
        [
            f"data set {name!r} is ready; every target takes NAME={name}. Next:",
            f"  make train-clip NAME={name}                        # a CLIP on your images (the committed one knows shapes)",
            f"  make embed NAME={name} CLIP=models/{name}/clip",
            f"  make index NAME={name}",
            f"  make train-prior train-decoder train-upsampler NAME={name}",
            f'  make sample NAME={name} PROMPT="..."',
        ]
    )


def _shards(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def _run(args) -> None:
    from pipelines import data_config as jobs
    from pipelines.download import format_summary

    if args.job == "ingest":
        from pipelines.ingest import ingest

        name = args.name or Path(args.folder).expanduser().resolve().name
        summary = ingest(args.folder, name, **parse_overrides(args.set))
        print(format_summary(summary))
        print(f"skipped without caption file: {summary['skipped_without_caption']}")
        print(f"shards: data/{name}/shards/   summary: data/{name}/download.json   config: data/{name}/data.yaml")
        print(next_steps(name))
        return
    if args.job == "download" and args.url_list:
        if not args.name:
            raise ConfigError("a new URL list needs a name for its data set: --name NAME (make download NAME=...)")
        url_list = args.url_list if storage.is_uri(args.url_list) else str(Path(args.url_list).expanduser().resolve())
        # The settings given (SET=) are kept in the new config: later downloads of the list need them.
        raw = dict(parse_overrides(args.set), url_list=url_list)
        jobs.new_data_set(args.name, raw, f"Written by make download URL_LIST={args.url_list} NAME={args.name}.")
        args.config, args.set = args.name, []
    if args.job == "import-clip-retrieval" and not jobs.is_config_path(args.config):
        if not (jobs.CONFIG_DIR / f"{args.config}.yaml").is_file() and not jobs.named_config(args.config).is_file():
            raw = parse_overrides(args.set)  # a new data set of imported embeddings; its settings kept
            jobs.new_data_set(args.config, raw, f"Written by make import-clip-retrieval SOURCE={args.source}.")
            args.set = []

    config = jobs.load_data_config(args.config, args.set)
    layout = config.layout
    if args.job == "data":
        plan = jobs.run_data(config)
        counts = ", ".join(f"{k} {v}" for k, v in plan["splits"].items())
        print(f"rendered {plan['n_samples']} images ({counts}; {len(plan['bad'])} bad URLs planned)")
        print(f"URL list: {layout.urls}   source: {layout.source}/")
    elif args.job == "download":
        print(format_summary(jobs.run_download(config, _shards(args.redo))))
        print(f"shards: {layout.shards}/   summary: {layout.download_summary}")
        if args.url_list:
            print(next_steps(config.name))
    elif args.job == "embed":
        manifest = jobs.run_embed(config, _shards(args.redo), args.clip)
        print(
            f"embedded {manifest['rows']} samples in {manifest['shards']} shards, skipped {manifest['skipped']}; "
            f"dim {manifest['dim']}, {manifest['dtype']}, computed in {manifest['encoder']['compute_dtype']}"
        )
        print(f"embeddings: {layout.embeddings}/   manifest: {layout.embeddings / '_manifest.json'}")
    elif args.job == "reset-embeddings":
        removed = jobs.reset_embeddings(config)
        print("removed " + (", ".join(f"{folder}/" for folder in removed) if removed else "nothing (no embeddings)"))
    elif args.job == "index":
        info = jobs.run_index(config)
        for kind, entry in info["indices"].items():
            print(
                f"{kind:>5}: {entry['factory']:<16} {info['count']} vectors, recall@10 vs exact {entry['recall_at_10']:.3f}"
            )
        print(f"index: {layout.index}/   summary: {layout.index / 'index.json'}")
    elif args.job == "curate":
        summary = jobs.run_curate(config, args.view)
        dropped = ", ".join(f"{why} {count}" for why, count in summary["dropped"].items()) or "none"
        print(f"view {args.view!r}: kept {summary['kept']} of {summary['rows']} rows; dropped: {dropped}")
        print(
            f"view: {layout.views / args.view}.parquet   summary: {layout.views / args.view}.json   page: {summary['page']}"
        )
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
    from pipelines.embed import DamagedShards

    args = _parser().parse_args(argv)
    try:
        _run(args)
    except DamagedShards as err:
        data, shards = make_arguments(args), ",".join(sorted(err.damaged))
        print(f"error: {err}", file=sys.stderr)
        print(
            f"repair: make download {data} REDO={shards} && make embed {data}"
            "   (downloads those shards again, from the ingested folder for an ingested data set, then embeds them)",
            file=sys.stderr,
        )
        return 1
    except (ConfigError, FileNotFoundError, KeyError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
