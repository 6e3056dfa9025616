"""The run's training config and data: preset + overrides, the data folder check, the held-out split.

Why the split lives here: the catalogue holds the *gallery* of the held-out (test) classes and the
queries are other images of those classes, drawn per class with a seed, so a query is never in
the catalogue it searches (the first hit cannot be the query itself).
"""

from __future__ import annotations

import os

import numpy as np

from pipeline.errors import DataFolderMissing
from pipeline.options import RunOptions


def training_config(opts: RunOptions):
    """The resolved :class:`trainer.config.Config` of the run (preset <- --folder/--data-root <- --set)."""
    from trainer.config import load_config

    overrides = []
    if opts.folder:
        overrides += ["data.dataset=folder", f"data.root={opts.folder}", "data.num_train_classes=null"]
    elif opts.data_root:
        overrides.append(f"data.root={opts.data_root}")
    overrides += list(opts.overrides)
    cfg = load_config(opts.config_path(), overrides)
    if cfg.data.root:  # every stage, and a rerun from another folder, reads the same place
        cfg.data.root = os.path.abspath(os.path.expanduser(cfg.data.root))
    return cfg


def require_data(cfg, opts: RunOptions) -> None:
    """Fail early, saying where the data belongs, when the data folder is absent."""
    root = cfg.data.root
    if root and os.path.isdir(root):
        return
    if opts.folder:
        raise DataFolderMissing(f"--folder {opts.folder}: no such folder; give a folder of ROOT/<class>/<image> files")
    where = f"--data-root {opts.data_root}" if opts.data_root else f"data.root of {opts.config_path()}"
    hint = ""
    if "flowers102" in root:
        hint = (" Put Oxford Flowers-102 there as images/<label>/image_NNNNN.jpg (labels 001..102; see "
                "../shared/data/README.md),")
    elif "omniglot" in root:
        hint = " Put Omniglot there as images_background/ and images_evaluation/ (see ../shared/data/README.md),"
    raise DataFolderMissing(f"data folder {root or '(none)'} ({where}) does not exist (relative paths are read from "
                            f"{os.getcwd()}).{hint} or pass --data-root DIR, or --folder DIR for any "
                            "DIR/<class>/<image> folder")


def class_name(path: str) -> str:
    """The class folder an image lies in (its parent folder's name)."""
    return os.path.basename(os.path.dirname(path))


def held_out_split(items: list[tuple[str, int]], queries_per_class: int, seed: int) -> tuple[list, list]:
    """(gallery, queries) of the held-out classes: per class, ``queries_per_class`` seeded queries.

    Classes with fewer than 2 images give no query (nothing of theirs would be left to find);
    every class keeps at least one gallery image.
    """
    by_label: dict[int, list[tuple[str, int]]] = {}
    for path, label in items:
        by_label.setdefault(int(label), []).append((path, int(label)))
    rng = np.random.default_rng(seed)
    gallery, queries = [], []
    for label in sorted(by_label):
        members = by_label[label]
        n_q = min(queries_per_class, len(members) - 1)
        picked = set(rng.permutation(len(members))[:max(0, n_q)].tolist())
        for i, it in enumerate(members):
            (queries if i in picked else gallery).append(it)
    return gallery, queries


__all__ = ["training_config", "require_data", "held_out_split", "class_name"]
