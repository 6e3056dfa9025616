"""The report's pictures (matplotlib, Agg canvas, no display): training curves, the 2-D map, speeds.

Each function writes one PNG and returns the numbers it drew, so ``report.json`` holds them too.
"""

from __future__ import annotations

import os

import numpy as np


def _figure(w: float = 6.0, h: float = 4.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def loss_curve(history: list[dict], path: str, parts: dict[str, str] | None = None) -> dict:
    """Training loss per epoch: the total and each part the training method reports.

    ``parts`` is the method's ``record key -> label`` (``get_method(name).loss_parts(method_config)``);
    None means IBC's two cross-entropies, the parts of runs logged before methods named their own.
    """
    from trainer.plots import loss_series

    fig, ax = _figure()
    series = {}
    for key, (label, pts) in loss_series(history, parts).items():
        series[key] = pts
        ax.plot(*zip(*pts), marker="o", label=label)
    _finish_axes(ax, series, "training loss", "no finished epoch")
    _save(fig, path)
    return series


def recall_curve(history: list[dict], path: str) -> dict:
    """Validation Recall@1 per epoch (or a note that the preset has no validation split)."""
    fig, ax = _figure()
    series = {}
    for split in ("val", "test"):
        pts = [(r["epoch"], 100 * r[f"{split}/recall@1"]) for r in history if r.get(f"{split}/recall@1") is not None]
        if pts:
            series[f"{split}/recall@1"] = pts
            ax.plot(*zip(*pts), marker="o", label=f"{split} R@1" + (" (test classes: paper protocol)"
                                                                    if split == "test" else ""))
    _finish_axes(ax, series, "Recall@1 (%)", "no validation split in this config\n(data.val_fraction = 0): "
                 "the final epoch is reported")
    _save(fig, path)
    return series


def _finish_axes(ax, series: dict, ylabel: str, empty_note: str) -> None:
    """The epoch axis, a grid and a legend; a centred note instead when there was nothing to draw."""
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if series:
        ax.legend()
    else:
        ax.text(0.5, 0.5, empty_note, ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])


def tsne_map(embeddings: np.ndarray, labels: np.ndarray, path: str, *, max_points: int = 1500,
             seed: int = 0) -> dict:
    """2-D t-SNE (scikit-learn) of a seeded sample of the embeddings, one colour per class."""
    from sklearn.manifold import TSNE

    n = len(embeddings)
    idx = np.arange(n) if n <= max_points else np.sort(np.random.default_rng(seed).permutation(n)[:max_points])
    x, y = embeddings[idx], labels[idx]
    perplexity = float(min(30.0, max(2.0, (len(x) - 1) / 3.0)))
    xy = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)
    fig, ax = _figure(7.0, 6.0)
    classes = np.unique(y)
    from matplotlib import colormaps

    k = len(classes)
    cmap = colormaps["tab10" if k <= 10 else "tab20" if k <= 20 else "nipy_spectral"]
    for i, c in enumerate(classes):
        m = y == c
        ax.scatter(xy[m, 0], xy[m, 1], s=8, color=cmap(i if k <= 20 else i / max(1, k - 1)),
                   label=str(c) if k <= 20 else None)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"t-SNE of {len(x)} test embeddings, {len(classes)} classes (colour = class)")
    if len(classes) <= 20:
        ax.legend(fontsize=6, markerscale=2, ncol=2, loc="best")
    _save(fig, path)
    return {"points": int(len(x)), "classes": int(len(classes)), "perplexity": perplexity, "seed": seed}


def speed_bars(rows: list[tuple[str, float]], path: str, title: str) -> list:
    """Horizontal bars of images/s."""
    rows = [(n, v) for n, v in rows if v]
    fig, ax = _figure(7.0, 0.45 * max(3, len(rows)) + 1.0)
    if rows:
        names, vals = zip(*rows)
        ax.barh(range(len(rows)), vals, color=["C0" if not n.startswith("index") else "C2" for n in names])
        ax.set_yticks(range(len(rows)), names)
        ax.invert_yaxis()
        for i, v in enumerate(vals):
            ax.text(v, i, f" {v:.0f}", va="center", fontsize=8)
    ax.set_xlabel("images / s")
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="x")
    _save(fig, path)
    return [list(r) for r in rows]


__all__ = ["loss_curve", "recall_curve", "tsne_map", "speed_bars"]
