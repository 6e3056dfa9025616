"""A PNG grid of queries and their top hits, for people who would rather look than read scores.

Why separate: matplotlib is heavy and optional, so it is imported only when a grid is drawn, and
through its object API with the Agg canvas (no pyplot, no global backend switch, no display).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from sdk.catalog import Hit
from sdk.preprocess import ImageError, describe_source, load_image

log = logging.getLogger(__name__)


def hit_image_from_metadata(hit: Hit) -> Any:
    """Default way to find a hit's picture: ``metadata["path"]`` (what ``ibc-retrieve index`` stores)."""
    meta = hit.metadata or {}
    return meta.get("path")


def _thumb(source: Any, size: int) -> np.ndarray | None:
    if source is None:
        return None
    try:
        img = load_image(source)
    except ImageError as e:
        log.warning("grid: cannot show %s: %s", e.source, e.reason)
        return None
    img.thumbnail((size, size))
    canvas = Image.new("RGB", (size, size), (255, 255, 255))  # square cells: rows line up, titles fit
    canvas.paste(img, ((size - img.size[0]) // 2, (size - img.size[1]) // 2))
    return np.asarray(canvas)


def _label(hit: Hit) -> str:
    text = str(hit.id)
    if len(text) > 22:
        text = "…" + text[-21:]
    label = (hit.metadata or {}).get("label")
    return f"{text}\n{hit.score:.3f}" + (f"  [{label}]" if label is not None else "")


def save_grid(out_png: str | os.PathLike, queries: Sequence[Any], hits: Sequence[Sequence[Hit]], *,
              image_of: Callable[[Hit], Any] = hit_image_from_metadata, max_hits: int | None = None,
              thumb: int = 160, query_labels: Sequence[Any] | None = None, dpi: int = 100) -> str:
    """Draw one row per query: the query image, then its hits (id, score, label) left to right.

    ``queries``: image sources (paths, bytes, PIL, arrays); ``hits``: what ``search`` returned for
    them; ``image_of``: how to find a hit's image (default: its ``metadata["path"]``). Matching
    labels are framed green, others red, when both query and hit carry a label.
    """
    from matplotlib.figure import Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    if len(queries) != len(hits):
        raise ValueError(f"got {len(queries)} queries but {len(hits)} hit lists")
    if not queries:
        raise ValueError("nothing to draw: no queries")
    cols = 1 + max((len(h) for h in hits), default=0) if max_hits is None else 1 + max_hits
    cols = max(cols, 2)
    rows = len(queries)
    fig = Figure(figsize=(cols * thumb / dpi * 1.1, rows * thumb / dpi * 1.35), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    for r, (query, row_hits) in enumerate(zip(queries, hits)):
        qlabel = query_labels[r] if query_labels is not None else None
        for c in range(cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if c == 0:
                pic = _thumb(query, thumb)
                name = describe_source(query).strip("'")
                ax.set_title("query\n" + (name if len(name) <= 22 else "…" + name[-21:]), fontsize=7)
            elif c - 1 < len(row_hits):
                hit = row_hits[c - 1]
                pic = _thumb(image_of(hit), thumb)
                ax.set_title(_label(hit), fontsize=7)
                hlabel = (hit.metadata or {}).get("label")
                if qlabel is not None and hlabel is not None:
                    for spine in ax.spines.values():
                        spine.set_visible(True)
                        spine.set_color("green" if hlabel == qlabel else "red")
                        spine.set_linewidth(3)
            else:
                ax.axis("off")
                continue
            if pic is not None:
                ax.imshow(pic)
            else:
                ax.text(0.5, 0.5, "(no image)", ha="center", va="center", fontsize=7, transform=ax.transAxes)
    fig.tight_layout()
    out_png = os.fspath(out_png)
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png, format="png")
    log.info("wrote %s (%d queries x %d columns)", out_png, rows, cols)
    return out_png


__all__ = ["save_grid", "hit_image_from_metadata"]
