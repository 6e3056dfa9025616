"""PNG plots of a run's metrics log: loss and Recall@K over epochs."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


# IBC's parts: the labels of runs logged before methods named their own
DEFAULT_PARTS = {"loss_backbone": "backbone CE", "loss_mpn": "MPN CE"}


def loss_series(records: list[dict], parts: dict[str, str] | None = None) -> dict[str, tuple[str, list]]:
    """``key -> (label, [(epoch, value), ...])`` for the total loss and each reported part.

    ``parts`` is the method's ``record key -> label`` (None: IBC's two cross-entropies, the parts of
    runs logged before methods named their own). A part equal to the total is drawn once, as the total.
    """
    series: dict[str, tuple[str, list]] = {}
    for key, label in (("loss", "total"), *(DEFAULT_PARTS if parts is None else parts).items()):
        pts = [(r["epoch"], r[key]) for r in records if r.get(key) is not None]
        if pts and (key == "loss" or pts != series.get("loss", ("", None))[1]):
            series[key] = (label, pts)
    return series


def plot_metrics(records: list[dict], out_dir: str, final: dict | None = None,
                 parts: dict[str, str] | None = None) -> list[str]:
    """Write ``loss.png`` and ``recall.png`` from per-epoch records; returns the paths written.

    ``loss.png`` shows the total loss and each part the training method reports (``parts``:
    record key -> label; a part equal to the total is drawn once).
    ``recall.png`` shows the per-epoch validation (or test, paper protocol) Recall@K; ``final``
    (the test report) adds the final test Recall@K as stars at the last epoch.
    """
    if not records:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    written = []
    epochs = [r["epoch"] for r in records]

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, pts in loss_series(records, parts).values():
        ax.plot(*zip(*pts), marker="o", label=label)
    written.append(_finish(plt, fig, ax, "training loss", os.path.join(out_dir, "loss.png")))

    keys = sorted({k for r in records for k in r if k.startswith(("val/recall@", "test/recall@"))},
                  key=lambda k: (k.split("/")[0], int(k.split("@")[1])))
    final_keys = [k for k in (final or {}) if k.startswith("recall@")]
    if keys or final_keys:
        fig, ax = plt.subplots(figsize=(6, 4))
        for key in keys:
            pts = [(r["epoch"], 100 * r[key]) for r in records if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=key.replace("recall@", "R@"))
        for i, key in enumerate(final_keys):
            ax.plot([epochs[-1]], [100 * final[key]], marker="*", markersize=12, linestyle="none",
                    color=f"C{(len(keys) + i) % 10}", label="final test " + key.replace("recall@", "R@"))
        written.append(_finish(plt, fig, ax, "Recall@K (%)", os.path.join(out_dir, "recall.png")))
    return written


def _finish(plt, fig, ax, ylabel: str, path: str) -> str:
    """Label, lay out, save and close one epoch-axis figure."""
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


__all__ = ["plot_metrics"]
