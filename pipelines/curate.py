"""`make curate`: decide what a model trains on, with the embeddings alone; writes a view.

Every filter is optional; a dropped row records the first reason that applies, in `views.REASONS` order:
opt-out lists (keys, URLs, domains: one file each, one entry a line), image size and aspect ratio (the
shard metadata's original size where img2dataset recorded it), caption–image agreement (the cosine of a
pair's embeddings, below a threshold or below a quantile of all rows), linear score heads on the image
embedding (a weight vector and a bias, the form of LAION's linear aesthetic head; each score becomes a column),
then duplicates among the rows still kept: exact ones by the `sha256` column img2dataset writes, then
near ones among the rest, by image-embedding cosine at or above `near_duplicate`. Near duplicates are found within clusters of
the vectors (`near_pairs`, never all pairs) and grouped with a union-find;
each group keeps its row of highest caption–image agreement (ties: the smallest key), so the result
depends only on the data and the settings (and, through k-means, on the machine's thread count). Groups
chain: A near B and B near C put A and C in one group even where A and C are further apart than the
threshold (the summary reports the lowest similarity of a dropped row to the row its group kept).
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from embeddings import store, views
from embeddings.config import ConfigError

PASSTHROUGH = ("url", "sha256", "width", "height", "original_width", "original_height")


class UnionFind:
    """Disjoint sets over 0..n-1 (path halving, union by size)."""

    def __init__(self, n: int):
        self.parent = np.arange(n)
        self.size = np.ones(n, dtype=np.int64)

    def find(self, i: int) -> int:
        parent = self.parent
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return int(i)

    def union(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        if a == b:
            return
        if self.size[a] < self.size[b]:
            a, b = b, a
        self.parent[b] = a
        self.size[a] += self.size[b]

    def groups(self) -> dict[int, list[int]]:
        """Root → members, for the sets of more than one element."""
        roots = np.array([self.find(i) for i in range(len(self.parent))])
        groups: dict[int, list[int]] = {}
        for i in np.flatnonzero(self.size[roots] > 1):
            groups.setdefault(int(roots[i]), []).append(int(i))
        return groups


def read_list(path: str | Path | None) -> set[str]:
    """The entries of an opt-out file (one a line; blank lines and # comments skipped)."""
    if path is None:
        return set()
    lines = Path(path).read_text().splitlines()
    return {line.strip() for line in lines if line.strip() and not line.strip().startswith("#")}


def domain_of(url: str | None) -> str:
    """The host of a URL, lower case, without a leading 'www.'."""
    host = (urlsplit(url or "").hostname or "").lower()
    return host.removeprefix("www.")


def load_head(path: str | Path, dim: int) -> tuple[np.ndarray, float]:
    """A linear score head (weight (D,), bias) from `.npy` ((D,) or (D+1,), the last entry the bias) or
    `.safetensors` (`weight` (D,) or (1, D), optional `bias`)."""
    path = Path(path)
    if path.suffix == ".npy":
        values = np.load(path).astype(np.float32).reshape(-1)
        weight, bias = (values[:dim], float(values[dim])) if values.size == dim + 1 else (values, 0.0)
    elif path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        tensors = load_file(str(path))
        if "weight" not in tensors:
            raise ConfigError(f"score head {path} has no 'weight' tensor (found {', '.join(sorted(tensors))})")
        weight = tensors["weight"].astype(np.float32).reshape(-1)
        bias = float(tensors["bias"].reshape(-1)[0]) if "bias" in tensors else 0.0
    else:
        raise ConfigError(f"score head {path}: use a .npy or .safetensors file")
    if weight.size != dim:
        raise ConfigError(f"score head {path} has {weight.size} weights; the embeddings have {dim} dimensions")
    return weight, bias


def near_pairs(
    vectors: np.ndarray,
    rows: np.ndarray,
    threshold: float,
    breadth: int,
    clusters: int | None = None,
    seed: int = 0,
    ray_tasks: int = 0,
) -> np.ndarray:
    """(P, 2) pairs (i, j), i < j, of `rows` whose unit `vectors` have cosine at or above `threshold`, never by all
    pairs: the rows are clustered (spherical k-means, `clusters` of them, default about √N), each row joins its
    `breadth` nearest clusters, and the pairs are searched exactly within each cluster (SemDeDup's way). A pair
    split between clusters is found when each member reaches the other's cluster: `breadth` trades time for
    recall (bench/curate.py measures the curve). `ray_tasks` > 0: the clusters are searched as that many Ray
    tasks over the cluster's nodes (`search_on_ray`), each sent only its clusters' vectors; the pairs are the
    same either way."""
    x = np.ascontiguousarray(vectors[rows], np.float32)
    members = cluster_members(x, clusters, breadth, seed)
    if ray_tasks > 0 and len(members) > 1:
        pairs = search_on_ray(x, members, threshold, ray_tasks)
    else:
        pairs = pairs_within(x, members, threshold, progress=len(members) >= 16)
    return rows[pairs] if len(pairs) else pairs


def cluster_members(x: np.ndarray, clusters: int | None, breadth: int, seed: int = 0) -> list[np.ndarray]:
    """The row indices of `x` in each of `clusters` spherical k-means clusters (default about √N; one cluster up
    to 4 096 rows), every row in its `breadth` nearest."""
    import faiss

    k = clusters or (1 if len(x) <= 4096 else round(np.sqrt(len(x))))
    if k <= 1:
        return [np.arange(len(x))]
    kmeans = faiss.Kmeans(x.shape[1], k, niter=10, seed=seed, spherical=True, max_points_per_centroid=64)
    kmeans.train(x)
    _, assigned = kmeans.index.search(x, min(breadth, k))
    order = np.argsort(assigned.reshape(-1), kind="stable")
    cuts = np.searchsorted(assigned.reshape(-1)[order], np.arange(k + 1))
    owners = order // assigned.shape[1]
    return [owners[cuts[c] : cuts[c + 1]] for c in range(k)]


def pairs_within(x: np.ndarray, members: list[np.ndarray], threshold: float, progress: bool = False) -> np.ndarray:
    """The unique pairs (i, j), i < j, of rows of `x` in one cluster of `members` with cosine ≥ `threshold`."""
    found = [np.zeros((0, 2), np.int64)]
    for member in tqdm(members, desc="near duplicates", unit="cluster", disable=not progress):
        for start in range(0, len(member), 4096):
            block = member[start : start + 4096]
            a, b = np.nonzero(x[block] @ x[member].T >= threshold)
            keep = block[a] < member[b]
            found.append(np.stack([block[a][keep], member[b][keep]], axis=1))
    return np.unique(np.concatenate(found), axis=0)


def _pairs_task(x: np.ndarray, members: list[np.ndarray], threshold: float) -> tuple[np.ndarray, str]:
    import ray

    return pairs_within(x, members, threshold), ray.get_runtime_context().get_node_id()


def search_on_ray(x: np.ndarray, members: list[np.ndarray], threshold: float, tasks: int) -> np.ndarray:
    """`pairs_within` as Ray tasks of one CPU each, spread over the nodes: the k-means clusters are dealt into
    `tasks` batches of about equal cost (a cluster of m rows costs m²), each task is sent its batch's rows of `x`
    only, and at most twice the Ray cluster's CPU count are in flight (with four tasks per CPU, about half the
    batches: up to about breadth/2 times `x` in Ray's object store at once)."""
    import ray

    remote = ray.remote(num_cpus=1, scheduling_strategy="SPREAD")(_pairs_task)
    batches = [[] for _ in range(min(tasks, len(members)))]
    cost = np.zeros(len(batches))
    for c in sorted(range(len(members)), key=lambda c: -len(members[c])):
        b = int(np.argmin(cost))
        batches[b].append(c)
        cost[b] += len(members[c]) ** 2
    window = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    pending, origin, found, nodes = {}, {}, [np.zeros((0, 2), np.int64)], set()
    todo = [b for b in batches if b]
    with tqdm(total=len(members), desc="near duplicates (ray)", unit="cluster") as bar:
        while todo or pending:
            while todo and len(pending) < window:
                batch = todo.pop(0)
                rows = np.unique(np.concatenate([members[c] for c in batch]))
                local = [np.searchsorted(rows, members[c]) for c in batch]
                ref = remote.remote(x[rows], local, threshold)
                pending[ref], origin[ref] = len(batch), rows
            ready, _ = ray.wait(list(pending), num_returns=1)
            ref = ready[0]
            pairs, node = ray.get(ref)
            found.append(origin.pop(ref)[pairs])
            nodes.add(node)
            bar.update(pending.pop(ref))
    print(f"[curate] near duplicates: {len(members)} clusters in {len(batches)} Ray tasks on {len(nodes)} node(s)")
    return np.unique(np.concatenate(found), axis=0)


def near_duplicate_pairs(
    image: np.ndarray, rows: np.ndarray, threshold: float, breadth: int, clusters: int | None, distribute: bool | None
) -> np.ndarray:
    """`near_pairs` in this process, or over the Ray cluster where `distribute` (None: where RAY_ADDRESS names
    one) with four tasks per CPU of the cluster."""
    if distribute is None:
        distribute = bool(os.environ.get("RAY_ADDRESS"))
    if not distribute:
        return near_pairs(image, rows, threshold, breadth, clusters)
    import ray

    from pipelines.cluster import ray_session

    with ray_session():
        tasks = 4 * max(1, int(ray.cluster_resources().get("CPU", 1)))
        return near_pairs(image, rows, threshold, breadth, clusters, ray_tasks=tasks)


def curate(
    embeddings_dir,
    views_dir,
    view: str,
    *,
    near_duplicate: float | None = 0.98,
    exact_duplicates: bool = True,
    clusters: int | None = None,
    search_breadth: int = 4,
    min_agreement: float | None = None,
    agreement_quantile: float | None = None,
    min_size: int | None = None,
    max_aspect: float | None = None,
    opt_out_keys: str | None = None,
    opt_out_urls: str | None = None,
    opt_out_domains: str | None = None,
    score_heads: dict | None = None,
    distribute: bool | None = None,
) -> dict:
    """Write `<view>.parquet` and `<view>.json` in `views_dir` for the embeddings of a data set; returns the
    summary. `near_duplicate`: the image-embedding cosine at or above which two rows are one
    group (None: no near-duplicate search); `clusters` (default about √N) and `search_breadth` (the clusters
    each row joins): how the search is split, `near_pairs`;
    `min_agreement` / `agreement_quantile`: drop pairs whose caption–image cosine is below the value / below
    that quantile of all rows; `min_size`: the smaller side in pixels; `max_aspect`: the longer side over the
    shorter; `opt_out_*`: files of keys, URLs or domains; `score_heads`: {name: {weights: file, min: x, max: y}};
    `distribute`: search the clusters as Ray tasks over the nodes (None: where a cluster is named by
    RAY_ADDRESS, as in a `make submit` job); where it runs changes no result, so it is not recorded."""
    settings = {k: v for k, v in locals().items() if k not in ("embeddings_dir", "views_dir", "distribute")}
    manifest = store.complete_manifest(embeddings_dir)
    names = store.shard_file(store.shard_paths(embeddings_dir)[0]).schema_arrow.names
    columns = ["key", *store.EMBEDDING_COLUMNS, *[c for c in PASSTHROUGH if c in names]]
    table = store.read_table(embeddings_dir, columns=columns, with_shard=True)
    keys = table.column("key").to_pylist()
    if len(set(keys)) != len(keys):
        raise ConfigError(f"the embeddings in {embeddings_dir} repeat keys: a view needs one row per key")
    image = store.arrow_to_vectors(table.column("image_embedding"))
    text = store.arrow_to_vectors(table.column("text_embedding"))
    n = len(keys)
    agreement = (image * text).sum(1)
    reason = np.full(n, "", dtype=object)  # "" while kept

    def drop(mask: np.ndarray, why: str) -> None:
        reason[np.asarray(mask, bool) & (reason == "")] = why

    column = lambda name: table.column(name).to_pylist() if name in table.column_names else None
    urls = column("url")
    if opt_out_keys:
        drop(np.isin(keys, list(read_list(opt_out_keys))), "opt_out_key")
    for path, why, value in (
        (opt_out_urls, "opt_out_url", lambda u: u),
        (opt_out_domains, "opt_out_domain", domain_of),
    ):
        if path:
            if urls is None:
                raise ConfigError(f"{why.replace('_', ' ')} needs a url column; these embeddings have none")
            if why == "opt_out_url":
                entries = read_list(path)
                drop(np.array([u in entries for u in urls]), why)
            else:  # the domain and its subdomains
                entries = {d.lower().removeprefix("www.") for d in read_list(path)}
                hosts = [value(u) for u in urls]
                drop(np.array([any(h == d or h.endswith("." + d) for d in entries) for h in hosts]), why)
    if min_size is not None or max_aspect is not None:
        sizes = lambda name: np.array([np.nan if v is None else v for v in column(name) or [None] * n], float)
        w = np.where(np.isnan(sizes("original_width")), sizes("width"), sizes("original_width"))  # per row
        h = np.where(np.isnan(sizes("original_height")), sizes("height"), sizes("original_height"))
        if np.isnan(w).all() or np.isnan(h).all():
            raise ConfigError("min_size / max_aspect need width and height columns; these embeddings have none")
        if min_size is not None:
            drop(np.fmin(w, h) < min_size, "size")
        if max_aspect is not None:
            drop(np.fmax(w, h) / np.fmin(w, h) > max_aspect, "aspect")
    cut = None
    if min_agreement is not None or agreement_quantile is not None:
        cut = max(
            min_agreement if min_agreement is not None else -np.inf,
            float(np.quantile(agreement, agreement_quantile)) if agreement_quantile is not None else -np.inf,
        )
        drop(agreement < cut, "agreement")
    scores = {}
    for head, spec in (score_heads or {}).items():
        unknown = set(spec) - {"weights", "min", "max"}
        if unknown or "weights" not in spec:
            raise ConfigError(f"score head {head!r}: give weights (and min and/or max), not {sorted(unknown)}")
        weight, bias = load_head(spec["weights"], image.shape[1])
        scores[head] = image @ weight + bias
        low, high = spec.get("min"), spec.get("max")
        drop(
            (scores[head] < low if low is not None else False) | (scores[head] > high if high is not None else False),
            "score",
        )

    # Duplicates, among the rows every filter above kept: first the same bytes, then near ones among the rest.
    duplicate_of = np.full(n, None, dtype=object)
    similarity = np.full(n, np.nan, dtype=np.float32)
    group_sizes = []

    def keep_one(groups: UnionFind, why: str) -> None:
        """Per group, keep the row of highest caption–image agreement (ties: the smallest key); drop the rest."""
        for members in groups.groups().values():
            keeper = min(members, key=lambda i: (-agreement[i], keys[i]))
            group_sizes.append(len(members))
            for i in members:
                if i != keeper:
                    reason[i], duplicate_of[i] = why, keys[keeper]
                    similarity[i] = float(image[i] @ image[keeper])

    sha = column("sha256") if exact_duplicates else None
    if sha is not None:
        groups, first = UnionFind(n), {}
        for i in np.flatnonzero(reason == ""):
            if sha[i]:
                groups.union(first.setdefault(sha[i], int(i)), int(i))
        keep_one(groups, "exact_duplicate")
    alive, links = np.flatnonzero(reason == ""), 0
    if near_duplicate is not None and len(alive) > 1:
        pairs = near_duplicate_pairs(image, alive, near_duplicate, search_breadth, clusters, distribute)
        groups = UnionFind(n)
        for i, j in pairs.tolist():
            groups.union(i, j)
        keep_one(groups, "near_duplicate")
        links = len(pairs)
    row_of = {key: i for i, key in enumerate(keys)}
    for i in np.flatnonzero([d is not None for d in duplicate_of]):  # a byte copy of a near duplicate, too,
        j = row_of[duplicate_of[i]]
        while duplicate_of[j] is not None:  # points at the row its whole group kept
            j = row_of[duplicate_of[j]]
        duplicate_of[i], similarity[i] = keys[j], float(image[i] @ image[j])

    kept = reason == ""
    out = {
        "key": pa.array(keys, pa.string()),
        "shard": table.column("shard"),
        "kept": pa.array(kept, pa.bool_()),
        "reason": pa.array([r or None for r in reason.tolist()], pa.string()),
        "agreement": pa.array(agreement.astype(np.float32)),
        "duplicate_of": pa.array(duplicate_of.tolist(), pa.string()),
        "similarity": pa.array(similarity, pa.float32(), mask=np.isnan(similarity)),
        **{f"score_{head}": pa.array(values.astype(np.float32)) for head, values in scores.items()},
    }
    dropped = {why: int((reason == why).sum()) for why in views.REASONS if (reason == why).any()}
    summary = {
        "view": view,
        "rows": n,
        "kept": int(kept.sum()),
        "dropped": dropped,
        "duplicate_groups": len(group_sizes),
        "largest_group": max(group_sizes, default=0),
        "near_duplicate_links": links,
        "lowest_duplicate_similarity": float(np.nanmin(similarity)) if np.isfinite(similarity).any() else None,
        "exact_duplicates_checked": sha is not None,
        "agreement_cut": cut,
        "settings": settings,
        "made_against": views.made_against(manifest),
    }
    views.write_view(views_dir, view, pa.table(out), summary)
    return summary
