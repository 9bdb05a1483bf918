"""The HTML page of a view: what each reason dropped, the duplicate groups side by side, the score histograms.

One self-contained page (thumbnails inlined, histograms as inline SVG) beside the view:
data/<name>/views/<view>.html.
"""

from __future__ import annotations

import html
import numpy as np

from embeddings import storage, store, views
from embeddings.knn import thumbnail
from embeddings.tars import read_images

STYLE = (
    "body{font-family:sans-serif;margin:2em}figure{display:inline-block;width:140px;margin:4px;vertical-align:top;"
    "font-size:11px}img{width:128px;height:128px;image-rendering:pixelated;border:1px solid #ccc}"
    ".group{border-top:1px solid #ddd;padding:4px 0}.kept img{border:3px solid #2a2}"
)


def _histogram(values: np.ndarray, title: str, marks: list[float], bins: int = 40) -> str:
    """An inline SVG histogram of `values` with vertical lines at `marks` (the thresholds)."""
    values = values[np.isfinite(values)]
    if not len(values):
        return ""
    low, high = float(min([values.min(), *marks])), float(max([values.max(), *marks]))
    counts, edges = np.histogram(values, bins=bins, range=(low, high + 1e-9))
    width, height = 480, 120
    x = lambda v: 10 + (v - low) / (high - low + 1e-12) * (width - 20)  # noqa: E731
    bars = "".join(
        f'<rect x="{x(a):.1f}" y="{height - 20 - 90 * c / counts.max():.1f}" width="{max(x(b) - x(a) - 1, 1):.1f}" '
        f'height="{90 * c / counts.max():.1f}" fill="#68a"/>'
        for a, b, c in zip(edges[:-1], edges[1:], counts)
    )
    lines = "".join(f'<line x1="{x(m):.1f}" x2="{x(m):.1f}" y1="5" y2="{height - 20}" stroke="red"/>' for m in marks)
    labels = f'<text x="10" y="{height - 4}" font-size="10">{low:.3f}</text>'
    labels += f'<text x="{width - 60}" y="{height - 4}" font-size="10">{high:.3f}</text>'
    return f"<h3>{html.escape(title)}</h3><svg width='{width}' height='{height}'>{bars}{lines}{labels}</svg>"


def _figure(key: str, caption: str, images: dict, note: str, kept: bool = False) -> str:
    src = thumbnail(images[key]) if key in images else ""
    return (
        f'<figure class="{"kept" if kept else ""}"><img src="{src}" alt="{html.escape(key)}"><figcaption>'
        f"<code>{html.escape(key)}</code> {html.escape(note)}<br>{html.escape(caption)}</figcaption></figure>"
    )


def write_view_page(layout, view: str, per_reason: int = 12, groups: int = 10):
    """Write data/<name>/views/<view>.html for a view made by `curate`; returns its path."""
    parquet, _ = views.view_paths(layout.views, view)
    summary = views.read_summary(layout.views, view)
    table = store.read_table(layout.embeddings, columns=["key", "caption"]).to_pydict()
    captions = dict(zip(table["key"], table["caption"]))
    rows = storage.read_parquet(parquet).to_pylist()
    by_key = {r["key"]: r for r in rows}
    shown: dict[str, list[dict]] = {}
    for row in sorted(rows, key=lambda r: r["key"]):
        if row["reason"] and len(shown.setdefault(row["reason"], [])) < per_reason:
            shown[row["reason"]].append(row)
    members: dict[str, list[dict]] = {}
    for row in rows:
        if row["duplicate_of"]:
            members.setdefault(row["duplicate_of"], []).append(row)
    largest = sorted(members.items(), key=lambda item: (-len(item[1]), item[0]))[:groups]
    # No thumbnails of opted-out images (their keys and captions are shown); none where the tars are absent.
    wanted = {r["key"]: r["shard"] for rs in shown.values() for r in rs if not r["reason"].startswith("opt_out")}
    for keeper, rs in largest:
        wanted[keeper] = by_key[keeper]["shard"]
        wanted.update({r["key"]: r["shard"] for r in rs})
    try:
        images = read_images(layout.shards, wanted)
    except (OSError, ValueError):  # no tars (imported embeddings) or a damaged one: the page without pictures
        images = {}
    settings = summary["settings"]
    parts = [
        f"<h1>view {html.escape(view)}: kept {summary['kept']} of {summary['rows']}</h1>",
        "<p>dropped: "
        + (", ".join(f"{html.escape(k)} {v}" for k, v in summary["dropped"].items()) or "none")
        + f"</p><pre>{html.escape(str(settings))}</pre>",
    ]
    marks = [m for m in (summary.get("agreement_cut"),) if m is not None]
    parts.append(_histogram(np.array([r["agreement"] for r in rows], float), "caption–image agreement", marks))
    for head, spec in (settings.get("score_heads") or {}).items():
        head_marks = [spec[b] for b in ("min", "max") if spec.get(b) is not None]
        parts.append(_histogram(np.array([r[f"score_{head}"] for r in rows], float), f"score {head}", head_marks))
    for reason in views.REASONS:
        if reason in shown and not reason.endswith("duplicate"):
            parts.append(f"<h2>dropped for {reason} ({summary['dropped'][reason]})</h2>")
            parts.append(
                "".join(
                    _figure(r["key"], captions.get(r["key"], ""), images, f"{r['agreement']:.3f}")
                    for r in shown[reason]
                )
            )
    if largest:
        parts.append(
            f"<h2>duplicate groups ({summary['duplicate_groups']}; the largest {len(largest)}, kept first)</h2>"
        )
        for keeper, rs in largest:
            cards = [_figure(keeper, captions.get(keeper, ""), images, "kept", kept=True)]
            cards += [
                _figure(r["key"], captions.get(r["key"], ""), images, f"{r['reason']} {r['similarity']:.4f}")
                for r in rs
            ]
            parts.append(f"<div class='group'>{''.join(cards)}</div>")
    path = storage.as_path(layout.views) / f"{view}.html"
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>view {html.escape(view)}</title>"
        f"<style>{STYLE}</style></head><body>{''.join(parts)}</body></html>\n"
    )
    storage.write_bytes(path, page.encode())
    return path
