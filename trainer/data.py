"""The trainer's view of the datasets: the torch-free readers live in :mod:`sdk.datasets` (the
exporter and ``ibc-retrieve index`` read the same layouts); this module keeps the old import path."""

from __future__ import annotations

from sdk.datasets import (  # noqa: F401
    DATASETS, IMAGE_EXTENSIONS, SPLITS, DataError, Items, class_lists, dataset_items, default_ks, describe,
    items_of, split_classes, training_classes,
)

__all__ = ["DataError", "dataset_items", "split_classes", "class_lists", "training_classes", "items_of", "describe",
           "default_ks"]
