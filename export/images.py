"""Image sets for calibration, accuracy control and the parity gate, preprocessed once.

Why: calibration and parity must see exactly the tensors the SDK will feed on the device, so
every image goes through :func:`sdk.preprocess.preprocess_image`. The result is cached in a
memory-mapped array in a scratch folder, because each variant re-reads the same held-out set
and a 5k-image set at 227² would not fit comfortably in RAM.

A set comes from a folder (``DIR/<class>/.../image``: the label is the image's folder relative
to ``DIR``, so Omniglot's ``alphabet/character`` nesting works) or from the checkpoint's own
dataset splits (``sdk.datasets.dataset_items``, the trainer's own reader).
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from tqdm.auto import tqdm

from export.errors import DataSetError
from sdk.datasets import IMAGE_EXTENSIONS
from sdk.preprocess import ImageError, PreprocessConfig, preprocess_image

log = logging.getLogger(__name__)

MAX_REPORTED_BAD = 5


@dataclass
class ImageSet:
    """Image paths with optional integer labels, and where they came from (for the manifest)."""

    role: str  # "calibration", "validation", "parity"
    paths: list[str]
    labels: np.ndarray | None
    origin: str

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        return 0 if self.labels is None else int(len(np.unique(self.labels)))

    def subset(self, limit: int | None, seed: int = 0) -> "ImageSet":
        """A seeded random subset of at most ``limit`` images, kept in the original order."""
        if not limit or limit >= len(self.paths):
            return self
        keep = np.sort(np.random.default_rng(seed).permutation(len(self.paths))[:limit])
        return self._take(keep, f"{self.origin}, {limit} sampled (seed {seed})")

    def without(self, paths, what: str) -> "ImageSet":
        """This set minus any of ``paths`` (``what`` they are goes into the origin)."""
        drop = set(paths)
        keep = np.array([i for i, p in enumerate(self.paths) if p not in drop], dtype=np.int64)
        if len(keep) == len(self.paths):
            return self
        return self._take(keep, f"{self.origin}, minus the {len(self.paths) - len(keep)} {what}")

    def _take(self, keep: np.ndarray, origin: str) -> "ImageSet":
        labels = None if self.labels is None else self.labels[keep]
        return ImageSet(self.role, [self.paths[i] for i in keep], labels, origin)

    def describe(self) -> dict:
        d = {"origin": self.origin, "images": len(self)}
        if self.labels is not None:
            d["classes"] = self.num_classes
        return d

    def require_labels(self, min_classes: int = 2) -> None:
        """Retrieval metrics need labels, at least two classes, and some class with two images."""
        if self.labels is None:
            raise DataSetError(f"{self.role} set {self.origin}: needs class labels "
                               "(put images in DIR/<class>/ folders)")
        uniq, counts = np.unique(self.labels, return_counts=True)
        if len(uniq) < min_classes or counts.max() < 2:
            raise DataSetError(f"{self.role} set {self.origin}: {len(self)} images in {len(uniq)} classes; "
                               f"retrieval needs at least {min_classes} classes and a class with 2+ images")


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def folder_set(root: str, role: str, labelled: bool = True) -> ImageSet:
    """All images under ``root``; with ``labelled`` the label is the image's folder relative to ``root``."""
    root = os.path.abspath(os.path.expanduser(os.fspath(root)))
    if not os.path.isdir(root):
        raise DataSetError(f"{role} folder {root} does not exist")
    found: list[tuple[str, str]] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = os.path.relpath(dirpath, root)
        found.extend((os.path.join(dirpath, f), rel) for f in sorted(filenames) if _is_image(f))
    if not found:
        raise DataSetError(f"{role} folder {root} holds no images ({', '.join(IMAGE_EXTENSIONS[:4])}, ...)")
    paths = [p for p, _ in found]
    if not labelled:
        return ImageSet(role, paths, None, f"folder {root}")
    names = sorted({c for _, c in found})
    index = {c: i for i, c in enumerate(names)}
    if names == ["."]:
        return ImageSet(role, paths, None, f"folder {root} (no class folders)")
    return ImageSet(role, paths, np.asarray([index[c] for _, c in found], np.int64), f"folder {root}")


def checkpoint_set(data_config: dict, split: str, role: str) -> ImageSet:
    """A split (train / val / test) of the dataset the checkpoint was trained on."""
    from sdk.datasets import dataset_items

    try:
        items = dataset_items(data_config, split)
    except (ValueError, OSError, KeyError) as e:
        raise DataSetError(f"{role} set: the checkpoint's {split} split of {data_config.get('dataset')} at "
                           f"{data_config.get('root')} cannot be read: {e}") from None
    if not items:
        raise DataSetError(f"{role} set: the checkpoint's {split} split of {data_config.get('root')} is empty")
    origin = f"{data_config.get('dataset', 'folder')} {split} split of {data_config.get('root')}"
    return ImageSet(role, [p for p, _ in items], np.asarray([lab for _, lab in items], np.int64), origin)


class PreprocessedImages:
    """An :class:`ImageSet` preprocessed into a float32 (N, 3, H, W) memory map under ``workdir``."""

    def __init__(self, images: ImageSet, preprocess: PreprocessConfig, workdir: str, progress: bool = True,
                 workers: int = 2):
        if len(images) == 0:
            raise DataSetError(f"{images.role} set {images.origin}: no images")
        self.images = images
        self.preprocess = preprocess
        c = preprocess.crop
        shape = (len(images), 3, c, c) if preprocess.layout == "NCHW" else (len(images), c, c, 3)
        self.path = os.path.join(workdir, f"{images.role}-{id(self):x}.f32")
        self.array = np.lib.format.open_memmap(self.path, mode="w+", dtype=np.float32, shape=shape)
        bad: list[str] = []

        def work(i: int) -> None:
            try:
                self.array[i] = preprocess_image(images.paths[i], preprocess)
            except ImageError as e:
                bad.append(str(e))

        with ThreadPoolExecutor(max(1, workers)) as pool:
            list(tqdm(pool.map(work, range(len(images))), total=len(images), desc=f"preprocess {images.role}",
                      unit="img", disable=not progress, leave=False))
        if bad:
            shown = "; ".join(sorted(bad)[:MAX_REPORTED_BAD])
            raise DataSetError(f"{images.role} set {images.origin}: {len(bad)} of {len(images)} images unreadable: "
                               f"{shown}{' ...' if len(bad) > MAX_REPORTED_BAD else ''}")
        self.array.flush()

    def __len__(self) -> int:
        return len(self.images)

    @property
    def labels(self) -> np.ndarray | None:
        return self.images.labels

    def batches(self, batch_size: int, limit: int | None = None) -> Iterator[np.ndarray]:
        n = len(self) if limit is None else min(limit, len(self))
        for start in range(0, n, batch_size):
            yield np.ascontiguousarray(self.array[start:min(start + batch_size, n)])

    def first(self, n: int) -> np.ndarray:
        return np.ascontiguousarray(self.array[:n])

    def close(self) -> None:
        self.array = None
        try:
            os.unlink(self.path)
        except OSError:
            pass
