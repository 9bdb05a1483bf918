"""What a caption names and what it leaves open: fidelity on the first, diversity over the second.

The synthetic source records, per row, which attributes its caption names (`shapes.NAMED_COLUMN`).
Judged per caption, over the images (or prior samples) drawn for it:

- fidelity: the share of the named attributes (colour, shape, size, position, background) that the
  pixel checker reads back as asked;
- open diversity: for each of background, position and size that the caption leaves open, the
  entropy of the values read across the caption's images, divided by that attribute's entropy over
  the training images (0: always the same; 1: as varied as the training data); averaged over the
  open attributes. Captions that name all three have none; an image where the checker finds no
  object counts as a miss for fidelity and adds nothing to diversity.

Intervals are bootstrap 95% intervals over captions (captions resampled with replacement).
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from pipelines import shapes

CHECKED = shapes.NAMEABLE  # what fidelity checks on a single object: colour, shape, size, position, background
OPEN = ("background", "position", "size")  # what open diversity counts (colour and shape are nearly always named)
BOOTSTRAP_SAMPLES = 2000


def named_of(row: dict) -> set[str]:
    """The checked attributes a single-object row's caption names (all of them for data without the column)."""
    named = row.get(shapes.NAMED_COLUMN)
    return set(CHECKED) if named is None else set(named.split()) & set(CHECKED)


def entropy(values: list) -> float:
    """Shannon entropy (nats) of the empirical distribution of `values`."""
    counts = np.asarray(list(Counter(values).values()), np.float64)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def reference_entropy(rows: list[dict]) -> dict[str, float]:
    """Entropy of each OPEN attribute over rows (the training images of single-object scenes)."""
    return {a: entropy([r[a] for r in rows]) for a in OPEN}


def data_draws(rows: list[dict], k: int, draws: int = 2000, seed: int = 0) -> dict[str, float]:
    """What open diversity k rows drawn at random from the data score, per OPEN attribute (the mean
    normalised entropy): the reference for a caption's k images, below 1 for small k (k images that
    all differ can score more)."""
    rng, reference = np.random.default_rng(seed), reference_entropy(rows)
    out = {}
    for a in OPEN:
        values = [r[a] for r in rows]
        picks = rng.integers(len(values), size=(draws, k))
        out[a] = (
            float(np.mean([entropy([values[i] for i in p]) for p in picks]) / reference[a]) if reference[a] else 0.0
        )
    return out


def read_image(image) -> dict:
    """The checker's reading of an image: the largest object's attributes and the background (None: no object)."""
    found = shapes.detect(image)
    reading = {a: (getattr(found[0], a) if found else None) for a in shapes.OBJECT_ATTRIBUTES}
    return {**reading, "background": shapes.detect_background(image)}


def caption_scores(readings: list[dict], row: dict, reference: dict[str, float]) -> dict:
    """Fidelity and open diversity of one caption's readings; per-attribute hits of what it names."""
    named = named_of(row)
    hits = {a: float(np.mean([r[a] == row[a] for r in readings])) for a in named}
    open_attributes = [a for a in OPEN if a not in named and reference[a] > 0]
    spreads = [  # an image where the checker found no object has no size or position to vary
        entropy(values) / reference[a]
        for a in open_attributes
        if (values := [r[a] for r in readings if r[a] is not None])
    ]
    return {
        "fidelity": float(np.mean(list(hits.values()))) if hits else None,
        "open_diversity": float(np.mean(spreads)) if spreads else None,
        "hits": hits,
    }


def bootstrap_interval(values, seed: int = 0) -> list[float] | None:
    """95% percentile interval of the mean of `values` (None entries dropped) over resampled captions."""
    x = np.asarray([v for v in values if v is not None], np.float64)
    if len(x) == 0:
        return None
    draws = np.random.default_rng(seed).integers(len(x), size=(BOOTSTRAP_SAMPLES, len(x)))
    return [float(v) for v in np.percentile(x[draws].mean(1), [2.5, 97.5])]


def paired_difference(a: list, b: list, seed: int = 0) -> dict | None:
    """Mean of a − b over captions where both are defined, with its bootstrap 95% interval (same captions
    resampled for both systems)."""
    pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    if not pairs:
        return None
    d = [x - y for x, y in pairs]
    return {"mean": float(np.mean(d)), "interval": bootstrap_interval(d, seed), "captions": len(d)}


def summarise(per_caption: list[dict], seed: int = 0) -> dict:
    """Means and intervals of fidelity and open diversity, and accuracy per named attribute, over captions."""
    out = {}
    for metric in ("fidelity", "open_diversity"):
        values = [c[metric] for c in per_caption]
        defined = [v for v in values if v is not None]
        out[metric] = float(np.mean(defined)) if defined else None
        out[f"{metric}_interval"] = bootstrap_interval(values, seed)
        out[f"{metric}_per_caption"] = values
    for a in CHECKED:
        hits = [c["hits"][a] for c in per_caption if a in c["hits"]]
        out[f"named_{a}_accuracy"] = float(np.mean(hits)) if hits else None
    return out


def prior_spread(prior_z: np.ndarray, rows: list[dict], train_z: np.ndarray, train_rows: list[dict], k: int) -> dict:
    """The prior's samples judged without decoding: each sampled embedding (rows × k, caption-major) takes the
    attributes of its nearest training image (cosine); fidelity and open diversity as for images."""
    nearest = (prior_z @ train_z.T).argmax(1)
    reference = reference_entropy(train_rows)
    scores = [
        caption_scores([train_rows[j] for j in nearest[i * k : (i + 1) * k]], row, reference)
        for i, row in enumerate(rows)
    ]
    return summarise(scores)
