"""Command line of the trainers: `python -m training JOB --config configs/JOB/NAME.yaml [--set key=value]`."""

from __future__ import annotations

import argparse
import sys

from embeddings.config import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    sub = parser.add_subparsers(dest="job", required=True)
    p = sub.add_parser("clip", help="train a small CLIP on a data set's shards and export it")
    p.add_argument("--config", default="configs/clip/shapes.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p = sub.add_parser("prior", help="train the diffusion prior on a data set's embeddings and export it")
    p.add_argument("--config", default="configs/prior/small.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p = sub.add_parser("sample-prior", help="text → CLIP image embeddings with an exported prior")
    p.add_argument("--config", default="configs/prior/small.yaml", help="the prior's training config")
    p.add_argument("--prompt", action="append", default=[], help="a caption (repeatable)")
    p.add_argument("--prompts", help="a file of captions, one a line")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int)
    p.add_argument("--guidance", type=float)
    p.add_argument("-k", type=int, default=5, help="nearest indexed images to print per prompt")
    p = sub.add_parser("clip-eval", help="zero-shot figures of a data set's embeddings (after make embed)")
    p.add_argument("--config", default="configs/data/synthetic.yaml", help="data set config")
    p.add_argument("--split", default="val")
    args = parser.parse_args(argv)
    try:
        if args.job == "clip":
            from training.clip import load_clip_config, train_clip

            metrics = train_clip(**load_clip_config(args.config, args.set))
            print({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()})
        elif args.job == "prior":
            from training.prior_job import load_prior_config, train_prior

            metrics = train_prior(**load_prior_config(args.config, args.set))
            print({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()})
        elif args.job == "sample-prior":
            _sample_prior(args)
        elif args.job == "clip-eval":
            import json
            from pathlib import Path

            from pipelines.data_config import load_data_config
            from training.clip_eval import evaluate_embeddings

            layout = load_data_config(args.config).layout
            metrics = evaluate_embeddings(layout.embeddings, args.split)
            out = Path("outputs") / f"clip-eval-{layout.root.name}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(metrics, indent=1) + "\n")
            print(json.dumps(metrics, indent=1))
            print(f"metrics: {out}")
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def _sample_prior(args) -> None:
    """Sample embeddings for prompts, print their nearest indexed images, save them as .npy."""
    from pathlib import Path

    import numpy as np

    from embeddings.index import Searcher
    from pipelines.data_config import load_data_config
    from training.prior_job import load_prior_config, sample_prior

    config = load_prior_config(args.config)
    layout = load_data_config(config["data"], [f"data_root={config['data_root']}"] if config.get("data_root") else None).layout
    prompts = list(args.prompt) + (Path(args.prompts).read_text().splitlines() if args.prompts else [])
    prompts = [p for p in prompts if p.strip()]
    if not prompts:
        raise ValueError("give PROMPT=\"...\" or PROMPTS=file.txt")
    name = config.get("name") or layout.root.name
    prior_dir = Path(config.get("models_root", "models")) / name / "prior"
    z = sample_prior(prompts, prior_dir, layout.embeddings, seed=args.seed, steps=args.steps, guidance_scale=args.guidance)
    searcher = Searcher(layout.index, "image")
    for prompt, hits in zip(prompts, searcher.search(z, args.k)):
        print(f"\n{prompt}")
        for hit in hits:
            print(f"  {hit['rank']:>2}  {hit['score']:.3f}  {hit['key']}  {hit['caption']}")
    out = Path("outputs") / "sample-prior" / f"embeddings-seed{args.seed}.npy"
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, z)
    print(f"\nembeddings ({z.shape[0]}×{z.shape[1]}, unit norm): {out}")


if __name__ == "__main__":
    sys.exit(main())
