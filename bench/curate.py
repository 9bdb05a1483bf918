"""Deduplication at scale: 1 M random 512-d unit vectors with 1% planted near duplicates, through the curate
job's search (pipelines/curate.py:near_pairs) and a union-find, against exact all-pairs search on a subset.

    python bench/curate.py [--vectors 1000000] [--dim 512] [--subset 50000] [--ray] [--out bench/results]

Reports wall time of the search and the grouping, peak memory, recall / precision of the planted pairs, the
recall against the search breadth (how many clusters each vector joins) as a curve, and on a subset the
pairs found against exact all-pairs search. Random vectors have no clusters, so a planted pair can fall into
different cells of the clustering: the curve shows how wide the search must be. --ray times the search again as
Ray tasks on a local Ray (the job's `distribute` path). Writes JSON and a markdown table to --out.
"""

from __future__ import annotations

import argparse
import inspect
import json
import resource
import time
from pathlib import Path

import numpy as np

from pipelines.curate import UnionFind, curate, near_pairs

JOB = {name: p.default for name, p in inspect.signature(curate).parameters.items()}  # the job's own defaults


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def planted_vectors(n: int, dim: int, fraction: float, noise: float, seed: int = 0):
    """n unit vectors of which the last n·fraction are near copies (cosine ≈ 1 − noise²·dim/2) of random earlier
    ones; returns the vectors and the (original, copy) pairs."""
    rng = np.random.default_rng(seed)
    copies = int(n * fraction)
    vectors = np.empty((n, dim), np.float32)
    for start in range(0, n - copies, 100_000):  # in blocks: a 1 M × 512 float64 draw would need 4 GB
        stop = min(n - copies, start + 100_000)
        vectors[start:stop] = unit(rng.standard_normal((stop - start, dim), dtype=np.float32))
    sources = rng.choice(n - copies, copies, replace=False)
    vectors[n - copies :] = unit(vectors[sources] + noise * rng.standard_normal((copies, dim), dtype=np.float32))
    return vectors, np.stack([sources, np.arange(n - copies, n)], axis=1)


def groups_of(n: int, pairs: np.ndarray) -> UnionFind:
    groups = UnionFind(n)
    for i, j in pairs.tolist():
        groups.union(i, j)
    return groups


def exact_pairs(vectors: np.ndarray, threshold: float, block: int = 4096) -> set[tuple[int, int]]:
    """Every pair (i < j) at or above `threshold`, by blocked all-pairs products."""
    found = set()
    for start in range(0, len(vectors), block):
        scores = vectors[start : start + block] @ vectors.T
        a, b = np.nonzero(scores >= threshold)
        found |= {(int(start + i), int(j)) for i, j in zip(a, b) if start + i < j}
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vectors", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--fraction", type=float, default=0.01, help="share of planted near duplicates")
    parser.add_argument("--noise", type=float, default=0.01, help="per-dimension noise of a copy (0.01: cosine ~0.975)")
    parser.add_argument("--threshold", type=float, default=0.95)
    parser.add_argument("--breadth", type=int, default=JOB["search_breadth"], help="clusters per vector, timed run")
    parser.add_argument("--curve", default="1,2,3,4", help="search breadths of the recall curve")
    parser.add_argument("--subset", type=int, default=50_000, help="rows checked against exact all-pairs search")
    parser.add_argument("--ray", action="store_true", help="also time the search as Ray tasks on a local Ray")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    import faiss

    results = {"vectors": args.vectors, "dim": args.dim, "planted": int(args.vectors * args.fraction)}
    results["threads"] = faiss.omp_get_max_threads()
    vectors, planted = planted_vectors(args.vectors, args.dim, args.fraction, args.noise)
    results["planted_cosine_min"] = float(np.min((vectors[planted[:, 0]] * vectors[planted[:, 1]]).sum(1)))
    planted_set = {tuple(sorted(p)) for p in planted.tolist()}
    rows = np.arange(args.vectors)

    curve = {}
    for breadth in sorted({*map(int, args.curve.split(",")), args.breadth}):  # the timed breadth always
        start = time.time()
        pairs = near_pairs(vectors, rows, args.threshold, breadth)
        seconds = time.time() - start
        found = {tuple(p) for p in pairs.tolist()}
        curve[breadth] = {"recall": len(found & planted_set) / len(planted_set), "seconds": round(seconds, 1)}
        if breadth == args.breadth:  # the timed run: search, then the groups
            start = time.time()
            groups = groups_of(args.vectors, pairs)
            roots = np.array([groups.find(i) for i in range(args.vectors)])
            results["dedup_s"] = round(seconds + time.time() - start, 1)
            results["recall"] = float(np.mean(roots[planted[:, 0]] == roots[planted[:, 1]]))
            results["pairs_found"], timed_pairs = len(found), pairs
            results["precision"] = len(found & planted_set) / max(len(found), 1)
            results["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    results["breadth"] = args.breadth
    results["recall_by_breadth"] = curve
    if args.ray:  # the job's `distribute` path on one node: what Ray's tasks and transfers cost over the matmuls
        import ray

        from pipelines.cluster import ray_session

        with ray_session():
            tasks = 4 * int(ray.cluster_resources()["CPU"])
            start = time.time()
            on_ray = near_pairs(vectors, rows, args.threshold, args.breadth, ray_tasks=tasks)
            results["ray"] = {
                "tasks": tasks,
                "seconds": round(time.time() - start, 1),
                "same_pairs": bool(np.array_equal(on_ray, timed_pairs)),
            }

    # A subset with planted pairs inside it (its first rows and the copies of those among them): the clustered
    # search against exact all-pairs search.
    originals = np.arange(args.subset - args.subset // 100)
    copies = planted[planted[:, 0] < len(originals)][: args.subset // 100, 1]
    sub_vectors = vectors[np.concatenate([originals, copies])]
    start = time.time()
    exact = exact_pairs(sub_vectors, args.threshold)
    results["exact_subset_s"] = round(time.time() - start, 1)
    start = time.time()
    clustered = {
        tuple(p) for p in near_pairs(sub_vectors, np.arange(len(sub_vectors)), args.threshold, args.breadth).tolist()
    }
    results["subset"] = {
        "rows": len(sub_vectors),
        "exact_pairs": len(exact),
        "clustered_pairs": len(clustered),
        "recall_vs_exact": len(clustered & exact) / max(len(exact), 1),
        "clustered_not_exact": len(clustered - exact),
        "clustered_s": round(time.time() - start, 1),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "curate.json").write_text(json.dumps(results, indent=1) + "\n")
    sub = results["subset"]
    lines = [
        "| what | figure |",
        "| --- | --- |",
        f"| vectors | {args.vectors} × {args.dim}, {results['planted']} planted (cosine ≥ {results['planted_cosine_min']:.3f}), threshold {args.threshold} |",
        f"| clustered search + union-find (breadth {args.breadth}, {results['threads']} threads) | {results['dedup_s']} s, peak memory {results['peak_rss_gb']} GB |",
        f"| planted pairs: recall / precision | {results['recall']:.4f} / {results['precision']:.4f} |",
        "| recall (seconds) by breadth | "
        + ", ".join(f"{b}: {c['recall']:.4f} ({c['seconds']} s)" for b, c in curve.items())
        + " |",
        f"| subset of {sub['rows']}: clustered pairs vs exact all-pairs | {sub['clustered_pairs']} vs {sub['exact_pairs']} "
        f"(recall {sub['recall_vs_exact']:.4f}, {sub['clustered_s']} s; exact {results['exact_subset_s']} s) |",
    ]
    if "ray" in results:
        ray_run = results["ray"]
        lines.append(
            f"| the search as {ray_run['tasks']} Ray tasks on this machine (breadth {args.breadth}) | "
            f"{ray_run['seconds']} s, the same pairs: {ray_run['same_pairs']} |"
        )
    (out / "curate.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
