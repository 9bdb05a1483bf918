"""How well a CLIP knows the shapes world: zero-shot attribute accuracy and text→image recall.

Zero-shot classification follows CLIP's prompt ensembling: each attribute value (say the colour
"red") is the normalised mean of the text embeddings of every caption that has that value, over
all values of the other attributes; an image takes the value whose ensemble is closest. Only
single-object images are scored.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np

from pipelines import shapes

ATTRIBUTES = {"colour": list(shapes.COLOURS), "shape": list(shapes.SHAPES)}


def prompts_for(attribute: str, value: str) -> list[str]:
    """Every canonical full caption whose `attribute` equals `value`."""
    grid = {
        "colour": list(shapes.COLOURS),
        "shape": list(shapes.SHAPES),
        "size": list(shapes.SIZES),
        "position": list(shapes.POSITIONS),
        "background": list(shapes.BACKGROUNDS),
    }
    grid[attribute] = [value]
    return [
        shapes.caption(shapes.Scene(b, (shapes.ShapeObject(s, c, z, p),)))
        for c, s, z, p, b in itertools.product(
            grid["colour"], grid["shape"], grid["size"], grid["position"], grid["background"]
        )
    ]


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True).clip(1e-12)


def class_embeddings(encode_text: Callable[[list[str]], np.ndarray], attribute: str) -> np.ndarray:
    """(values, D) prompt-ensemble embeddings for one attribute."""
    return np.stack(
        [_normalise(_normalise(encode_text(prompts_for(attribute, v))).mean(0)) for v in ATTRIBUTES[attribute]]
    )


def zero_shot(image_z: np.ndarray, truth: dict[str, list[str]], encode_text: Callable[[list[str]], np.ndarray]) -> dict:
    """Accuracy per attribute of unit image embeddings (N, D) against true values {attribute: [N]}."""
    result = {}
    for attribute, values in ATTRIBUTES.items():
        predicted = (image_z @ class_embeddings(encode_text, attribute).T).argmax(1)
        result[f"{attribute}_accuracy"] = float(np.mean([values[p] == t for p, t in zip(predicted, truth[attribute])]))
    return result


def text_to_image_recall(image_z: np.ndarray, text_z: np.ndarray, k: int = 10) -> float:
    """Share of captions whose own image ranks in the top k among all images (pairs aligned by row)."""
    scores = text_z @ image_z.T  # (N, N)
    own = np.diag(scores)
    rank = (scores > own[:, None]).sum(1)
    return float(np.mean(rank < k))


def evaluate_clip(image_z, text_z, rows: list[dict], encode_text, pairs: int = 1000) -> dict:
    """Zero-shot accuracy on single-object rows of the shapes world (none elsewhere: your own data has no
    attributes to check), recall@10 among the first `pairs` pairs, and the mean cosine of a caption to its own
    image, to the next pair's image, and of two images (the next pair's)."""
    single = [i for i, r in enumerate(rows) if r.get("n_objects") == 1 and all(a in r for a in ATTRIBUTES)]
    metrics = {}
    if single:
        metrics = zero_shot(image_z[single], {a: [rows[i][a] for i in single] for a in ATTRIBUTES}, encode_text)
    n = min(pairs, len(rows))
    metrics["recall_at_10"] = text_to_image_recall(image_z[:n], text_z[:n], 10)
    # How close a caption sits to its own image, against another pair's image and against another image.
    metrics["paired_cosine"] = float((text_z[:n] * image_z[:n]).sum(1).mean())
    metrics["random_pair_cosine"] = float((text_z[:n] * np.roll(image_z[:n], 1, axis=0)).sum(1).mean())
    metrics["random_images_cosine"] = float((image_z[:n] * np.roll(image_z[:n], 1, axis=0)).sum(1).mean())
    metrics["single_object_images"] = len(single)
    metrics["recall_pairs"] = n
    return metrics


def evaluate_embeddings(embeddings_dir, split: str = "val", pairs: int = 1000) -> dict:
    """The same figures from an embedding folder (make embed's output), prompts through its own CLIP."""
    from embeddings import store
    from embeddings.knn import encoder_from_manifest

    table = store.read_table(embeddings_dir, filters=[("split", "=", split)])
    if table.num_rows == 0:
        raise ValueError(f"no {split!r} rows in {embeddings_dir}")
    encoder = encoder_from_manifest(embeddings_dir)
    rows = table.select([c for c in table.column_names if c not in store.EMBEDDING_COLUMNS]).to_pylist()
    image_z = store.arrow_to_vectors(table.column("image_embedding"))
    text_z = store.arrow_to_vectors(table.column("text_embedding"))
    metrics = evaluate_clip(image_z, text_z, rows, lambda texts: encoder.encode_texts(texts).numpy(), pairs)
    return {"split": split, "encoder": encoder.info["model"], "checksum": encoder.checksum, **metrics}
