"""Nearest-neighbour inspection: a text, an image file or a stored key → the closest stored samples.

Prints a table and writes one self-contained HTML page (thumbnails inlined as base64, read from
the webdataset tars by key) so a person can see what the embedding space thinks is close.
"""

from __future__ import annotations

import base64
import html
import io
import re
from pathlib import Path

import numpy as np
from PIL import Image

from embeddings import store
from embeddings.encoders import EncoderSpec, load_encoder
from embeddings.index import Searcher
from embeddings.tars import read_images


def encoder_from_manifest(embeddings_dir: str | Path, **overrides):
    """The CLIP that made an embedding folder, checked against the manifest's checksum."""
    manifest = store.read_manifest(embeddings_dir)
    enc = manifest["encoder"]
    spec = EncoderSpec(model=enc["model"], weights=enc.get("weights"), pretrained=enc.get("pretrained"), **overrides)
    encoder = load_encoder(spec)
    store.check_compatible(manifest, encoder.info)
    return encoder


def query_vector(
    embeddings_dir, *, query: str | None = None, image: str | None = None, key: str | None = None
) -> np.ndarray:
    """The (D,) vector of exactly one of: a text, an image file, a stored key (its image embedding)."""
    if sum(x is not None for x in (query, image, key)) != 1:
        raise ValueError("give exactly one of QUERY (text), IMAGE (path) or KEY (a stored sample)")
    if key is not None:
        table = store.read_table(embeddings_dir, columns=["key", "image_embedding"], filters=[("key", "=", key)])
        if table.num_rows == 0:
            raise KeyError(f"key {key!r} is not in {embeddings_dir}")
        return store.arrow_to_vectors(table.column("image_embedding"))[0]
    encoder = encoder_from_manifest(embeddings_dir)
    if query is not None:
        return encoder.encode_texts([query])[0].numpy()
    with Image.open(image) as picture:
        return encoder.encode_images(encoder.preprocess(picture.convert("RGB"))[None])[0].numpy()


def thumbnail(data: bytes, size: int = 128) -> str:
    """Image bytes → a PNG data URI of size × size (nearest neighbour, so small images stay sharp)."""
    with Image.open(io.BytesIO(data)) as image:
        image = image.convert("RGB").resize((size, size), Image.NEAREST)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def write_page(
    path: Path, title: str, rows: list[dict], images: dict[str, bytes], query_image: bytes | None = None
) -> Path:
    """One HTML page: the query, then a grid of neighbours with rank, score, key and caption."""
    cards = []
    for row in rows:
        src = thumbnail(images[row["key"]]) if row["key"] in images else ""
        cards.append(
            f'<figure><img src="{src}" alt="{html.escape(row["key"])}"><figcaption>#{row["rank"]} · {row["score"]:.3f}'
            f"<br><code>{html.escape(row['key'])}</code><br>{html.escape(row['caption'])}</figcaption></figure>"
        )
    head = f'<img src="{thumbnail(query_image)}" alt="query">' if query_image else ""
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>knn: " + html.escape(title) + "</title><style>"
        "body{font-family:sans-serif;margin:2em}figure{display:inline-block;width:150px;margin:6px;vertical-align:top;"
        "font-size:12px}img{width:128px;height:128px;image-rendering:pixelated;border:1px solid #ccc}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>{head}<div>{''.join(cards)}</div></body></html>\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page)
    return path


def slug(text: str) -> str:
    """A file-name-safe short form of a query."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "query"


def format_table(rows: list[dict]) -> str:
    """Rows as an aligned text table."""
    lines = [f"{'rank':>4}  {'score':>6}  {'key':<12}  caption"]
    lines += [f"{r['rank']:>4}  {r['score']:>6.3f}  {r['key']:<12}  {r['caption']}" for r in rows]
    return "\n".join(lines)


def knn(
    layout, *, query=None, image=None, key=None, k: int = 10, kind: str = "image", out_dir="outputs/knn"
) -> tuple[list[dict], Path]:
    """Search `layout`'s index; returns the rows and the HTML page written."""
    vector = query_vector(layout.embeddings, query=query, image=image, key=key)
    rows = Searcher(layout.index, kind).search(vector, k)[0]
    images = read_images(layout.shards, {r["key"]: r["shard"] for r in rows})
    title = query if query is not None else (f"image {image}" if image is not None else f"key {key}")
    query_image = Path(image).read_bytes() if image is not None else None
    if key is not None:
        query_image = (
            next(iter(read_images(layout.shards, {key: rows[0]["shard"]}).values()), None)
            if rows and rows[0]["key"] == key
            else None
        )
    page = write_page(Path(out_dir) / f"{slug(title)}.html", f"{title} → {kind} index", rows, images, query_image)
    return rows, page
