"""Command line of the trainers: `python -m training JOB --config configs/JOB/NAME.yaml [--set key=value]`."""

from __future__ import annotations

import argparse
import sys

from embeddings.config import ConfigError
from pipelines.data_config import DEFAULT_DATA


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
    p.add_argument("--data", help="the data set (a name or a config path) in place of the config's")
    p.add_argument("--prompt", action="append", default=[], help="a caption (repeatable)")
    p.add_argument("--prompts", help="a file of captions, one a line")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int)
    p.add_argument("--guidance", type=float)
    p.add_argument("-k", type=int, default=5, help="nearest indexed images to print per prompt")
    for job, what in (("decoder", "the CLIP-conditioned decoder"), ("upsampler", "the 4x upsampler")):
        p = sub.add_parser(job, help=f"train {what} on a data set's shards joined with its embeddings, and export it")
        p.add_argument("--config", default=f"configs/decoder/{'small' if job == 'decoder' else 'upsampler-small'}.yaml")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    for job, what in (
        ("sample", "text → prior → decoder → upsampler"),
        ("variations", "decodings of one image's embedding"),
        ("interpolate", "slerp between two images' embeddings"),
        ("textdiff", "an image's embedding moved along a text difference"),
    ):
        p = sub.add_parser(job, help=f"{what}; writes a PNG grid")
        p.add_argument("--models", help="folder holding prior/, decoder/, upsampler/ (default: models/<data set>)")
        p.add_argument("--data", default=DEFAULT_DATA, help="the data set (a name or a config path) trained on")
        p.add_argument(
            "--decoder", default="decoder", help="the decoder export to use (decoder-text: the GLIDE-like baseline)"
        )
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--steps", type=int, help="decoder sampling steps (default: the export's)")
        p.add_argument("--guidance", type=float, help="decoder guidance scale (default: the export's)")
        p.add_argument("-n", type=int, help="images per prompt / per row")
        p.add_argument("--out", help="PNG path (default: outputs/<command>/...)")
        if job == "sample":
            p.add_argument("--prompt", action="append", default=[], help="a caption (repeatable)")
            p.add_argument("--prompts", help="a file of captions, one a line")
            p.add_argument("--prior-guidance", type=float, help="prior guidance scale (default: the export's)")
        elif job in ("variations", "textdiff"):
            p.add_argument("--image", required=True)
        if job == "interpolate":
            p.add_argument("--a", required=True)
            p.add_argument("--b", required=True)
        if job == "textdiff":
            p.add_argument("--from", dest="from_text", required=True)
            p.add_argument("--to", dest="to_text", required=True)
    p = sub.add_parser(
        "eval", help="unCLIP against the GLIDE-like baseline: fidelity, open diversity, accuracy, CLIP score, Fréchet"
    )
    p.add_argument("--config", default=DEFAULT_DATA, help="the data set: a name or a config path")
    # Unset options take training.unclip_eval.evaluate's defaults.
    p.add_argument("--models", help="folder of the exports (default: models/<data set>)")
    p.add_argument("--out", help="output folder")
    p.add_argument("--captions", type=int, help="captions per set (val, heldout)")
    p.add_argument("--per-caption", type=int, help="images drawn per caption (diversity)")
    p.add_argument("--scales", help="decoder guidance scales, comma-separated")
    p.add_argument("--steps", type=int, help="decoder sampling steps")
    p.add_argument("--upsampler-steps", type=int, help="upsampler sampling steps")
    p.add_argument("--prior-captions", type=int, help="val captions the prior is judged on alone")
    p.add_argument("--prior-samples", type=int, help="prior samples per caption")
    p.add_argument("--seed", type=int)
    p.add_argument("--outputs", default="outputs", help="where the training runs' logs are (for the loss plot)")
    p = sub.add_parser(
        "eval-compare", help="two eval folders of the same captions side by side: before → after, paired differences"
    )
    p.add_argument("--before", required=True, help="the eval folder of the models before the change")
    p.add_argument("--after", required=True, help="the eval folder of the models after it")
    p.add_argument(
        "--system",
        default="unclip",
        choices=("unclip", "glide_like", "unclip_full", "decoder_true_z"),
        help="whose cells",
    )
    p.add_argument("--out", help="also write the table to this file")
    p = sub.add_parser("export-diffusers", help="exported models as folders diffusers' pipelines load")
    p.add_argument("--models", help="folder holding prior/ (default: models/<data set>)")
    p.add_argument("--data", default=DEFAULT_DATA, help="the data set (a name or a config path) trained on")
    p.add_argument("--out", required=True, help="the folder to write")
    p = sub.add_parser("clip-eval", help="zero-shot figures of a data set's embeddings (after make embed)")
    p.add_argument("--config", default=DEFAULT_DATA, help="the data set: a name or a config path")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a data config key")
    p.add_argument("--split", default="val")
    args = parser.parse_args(argv)
    try:
        if args.job == "clip":
            from training.clip import load_clip_config, train_clip

            metrics = train_clip(**load_clip_config(args.config, args.set))
            print({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()})
        elif args.job == "prior":
            from training.launch import run_job
            from training.prior_job import load_prior_config, train_prior

            metrics = run_job(train_prior, load_prior_config(args.config, args.set))
            print({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()})
        elif args.job in ("decoder", "upsampler"):
            from training import decoder_job
            from training.launch import run_job

            load = decoder_job.load_decoder_config if args.job == "decoder" else decoder_job.load_upsampler_config
            train = decoder_job.train_decoder if args.job == "decoder" else decoder_job.train_upsampler
            metrics = run_job(train, load(args.config, args.set))
            print({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items() if k != "join"})
        elif args.job in ("sample", "variations", "interpolate", "textdiff"):
            _generate(args)
        elif args.job == "eval":
            _evaluate(args)
        elif args.job == "eval-compare":
            from pathlib import Path

            from training.unclip_eval import compare, comparison_table

            table = comparison_table(compare(args.before, args.after, args.system))
            print(table)
            if args.out:
                Path(args.out).write_text(table + "\n")
        elif args.job == "sample-prior":
            _sample_prior(args)
        elif args.job == "export-diffusers":
            from training.diffusers_export import export_diffusers

            print("\n".join(export_diffusers(args.models or models_of(args.data), args.out)))
        elif args.job == "clip-eval":
            import json
            from pathlib import Path

            from pipelines.data_config import load_data_config
            from training.clip_eval import evaluate_embeddings

            layout = load_data_config(args.config, args.set).layout
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


def models_of(data: str):
    """models/<name> of a data set (a name or a config path): where its training jobs export by default."""
    from pathlib import Path

    from pipelines.data_config import load_data_config
    from training.settings import Run

    return Path(Run.models_root) / load_data_config(data).name


def _generate(args) -> None:
    """The four generation commands: build the grid, write it, print where."""
    from pathlib import Path

    from embeddings.knn import slug
    from training.generate import UnCLIP
    from training.grid import save_grid

    model = UnCLIP.load(args.models or models_of(args.data), args.decoder)
    decode = {"steps": args.steps, "guidance_scale": args.guidance}
    if args.job == "sample":
        prompts = list(args.prompt) + (Path(args.prompts).read_text().splitlines() if args.prompts else [])
        prompts = [p.strip() for p in prompts if p.strip()]
        if not prompts:
            raise ValueError('give PROMPT="..." or PROMPTS=file.txt')
        n = args.n or 4
        images = model.text_to_image(prompts, n, args.seed, args.prior_guidance, **decode)
        name = slug(prompts[0]) + (f"-and-{len(prompts) - 1}-more" if len(prompts) > 1 else "")
        print("rows, top to bottom:\n" + "\n".join(f"  {p}" for p in prompts))
    elif args.job == "variations":
        n = args.n or 8
        images, name = model.variations(args.image, n, args.seed, **decode), Path(args.image).stem
    elif args.job == "interpolate":
        n = args.n or 8
        images, name = (
            model.interpolate(args.a, args.b, n, args.seed, **decode),
            f"{Path(args.a).stem}-{Path(args.b).stem}",
        )
    else:
        n = args.n or 6
        images = model.textdiff(args.image, args.from_text, args.to_text, n, seed=args.seed, **decode)
        name = f"{Path(args.image).stem}-{slug(args.from_text)}-to-{slug(args.to_text)}"
    out = Path(args.out) if args.out else Path("outputs") / args.job / f"{name}-seed{args.seed}.png"
    save_grid(images, out, columns=n)
    print(f"{len(images)} images ({images.shape[1]} px): {out}")


def _evaluate(args) -> None:
    """make eval: the comparison, then the loss curves of the training runs beside it."""
    import inspect
    from pathlib import Path

    from training.unclip_eval import evaluate, main_summary, plot_losses

    defaults = {n: p.default for n, p in inspect.signature(evaluate).parameters.items()}
    models, out = args.models or models_of(args.config), args.out or defaults["out_dir"]
    given = {
        "captions": args.captions,
        "per_caption": args.per_caption,
        "guidance_scales": tuple(float(x) for x in args.scales.split(",") if x.strip()) if args.scales else None,
        "steps": args.steps,
        "upsampler_steps": args.upsampler_steps,
        "prior_captions": args.prior_captions,
        "prior_samples": args.prior_samples,
        "seed": args.seed,
    }
    summary = evaluate(args.config, models, out, **{k: v for k, v in given.items() if v is not None})
    name = Path(models).name
    runs = {
        kind: Path(args.outputs) / f"train-{kind}-{name}" for kind in ("prior", "decoder", "upsampler", "decoder-text")
    }
    losses = plot_losses(runs, Path(out) / "losses.png")
    print(main_summary(summary))
    print(
        f"\nmetrics: {Path(out) / 'metrics.json'}  table: {Path(out) / 'table.md'}  plots: "
        f"{Path(out) / 'guidance.png'}{'  ' + str(losses) if losses else ''}  grids: {Path(out)}/samples-*.png"
    )


def _sample_prior(args) -> None:
    """Sample embeddings for prompts, print their nearest indexed images, save them as .npy."""
    from pathlib import Path

    import numpy as np

    from embeddings.index import Searcher
    from training.generate import sample_prior
    from training.prior_job import PRIOR_JOB, load_prior_config
    from training.settings import Run

    run = Run(**PRIOR_JOB.split(load_prior_config(args.config, [f"data={args.data}"] if args.data else None))["run"])
    layout = run.layout()
    prompts = list(args.prompt) + (Path(args.prompts).read_text().splitlines() if args.prompts else [])
    prompts = [p for p in prompts if p.strip()]
    if not prompts:
        raise ValueError('give PROMPT="..." or PROMPTS=file.txt')
    prior_dir = Path(run.models_root) / (run.name or layout.root.name) / "prior"
    z = sample_prior(
        prompts, prior_dir, layout.embeddings, seed=args.seed, steps=args.steps, guidance_scale=args.guidance
    )
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
