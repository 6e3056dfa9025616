"""Datasets and their class splits: (image path, class label) lists for train / val / test.

Torch-free on purpose: the trainer, the exporter (calibration / parity sets) and ``ibc-retrieve
index --dataset`` all read the same layouts through this one module (``trainer.data`` re-exports it).

Supported layouts (``data.dataset``):

* ``cub``     CUB-200-2011: ``ROOT/images/NNN.name/*.jpg``; classes 1-100 train, 101-200 test.
* ``cars``    Cars196: ``ROOT/cars_annos.mat`` + ``ROOT/car_ims/`` (or an image folder of 196
              classes); classes 1-98 train, 99-196 test.
* ``sop``     Stanford Online Products: ``ROOT/Ebay_train.txt`` / ``ROOT/Ebay_test.txt``.
* ``inshop``  In-Shop: ``ROOT/list_eval_partition.txt`` (train / query / gallery), images under ROOT.
* ``folder``  any ``ROOT/<class>/*`` (or ``ROOT/images/<class>/*``); the first ``num_train_classes``
              classes in sorted order train (default: the first half), the rest test.
* ``omniglot`` ``ROOT/images_background/<alphabet>/<character>/*.png`` train,
              ``ROOT/images_evaluation/...`` test.

Validation (``split="val"``) is a seeded, held-out share of the TRAINING classes (never test
classes); ``split="train"`` is the training classes minus those. With ``select_on="test"`` (the
paper's protocol) there is no validation split. Labels of every split are contiguous ints
0..C-1 in sorted class order within that split.
"""

from __future__ import annotations

from sdk.errors import IbcError

import logging
import os
from dataclasses import asdict, is_dataclass
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
SPLITS = ("train", "val", "test", "query", "gallery")
DATASETS = ("cub", "cars", "sop", "inshop", "folder", "omniglot")

Items = list[tuple[str, int]]


class DataError(IbcError, ValueError):
    """The dataset folder or its index files are missing or malformed (the message names the file)."""


def _as_dict(data_config: Any) -> dict:
    if is_dataclass(data_config):
        return asdict(data_config)
    if isinstance(data_config, dict):
        return data_config
    raise TypeError(f"data_config must be a dict or DataConfig, got {type(data_config).__name__}")


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _require_dir(path: str, what: str) -> None:
    if not path:
        raise DataError(f"no dataset root given ({what}); pass --data-root or set data.root")
    if not os.path.isdir(path):
        raise DataError(f"{what}: folder {path} does not exist")


def _images_in(folder: str) -> list[str]:
    return sorted(os.path.join(folder, n) for n in os.listdir(folder)
                  if _is_image(n) and os.path.isfile(os.path.join(folder, n)))


def _folder_classes(root: str) -> list[tuple[str, list[str]]]:
    """``root/<class>/*`` -> [(class name, sorted image paths)] in sorted class order; empty classes dropped."""
    classes = []
    for name in sorted(os.listdir(root)):
        d = os.path.join(root, name)
        if os.path.isdir(d) and not name.startswith("."):
            files = _images_in(d)
            if files:
                classes.append((name, files))
            else:
                log.warning("class folder %s holds no images; ignored", d)
    if not classes:
        raise DataError(f"{root}: no class folders with images found (expected ROOT/<class>/<image>)")
    return classes


def _folder_root(root: str) -> str:
    """Accept ROOT/<class>/* or ROOT/images/<class>/* (e.g. ../shared/data/flowers102)."""
    sub = os.path.join(root, "images")
    if os.path.isdir(sub) and not any(_is_image(n) for n in os.listdir(root)):
        has_class_dirs = any(os.path.isdir(os.path.join(root, n)) and n != "images" and not n.startswith(".")
                             for n in os.listdir(root))
        if not has_class_dirs:
            return sub
    return root


def _read_lines(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise DataError(f"index file {path} does not exist")
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]


def _group(pairs: list[tuple[str, str]]) -> list[tuple[str, list[str]]]:
    by: dict[str, list[str]] = {}
    for path, cls in pairs:
        by.setdefault(cls, []).append(path)
    return [(c, sorted(by[c])) for c in sorted(by, key=_natural_key)]


def _natural_key(s: str):
    return (0, int(s), "") if s.isdigit() else (1, 0, s)


# --------------------------------------------------------------------------- per-dataset class lists


def _cub(root: str) -> dict[str, list]:
    img = os.path.join(root, "images")
    _require_dir(img, "CUB-200-2011 (expected ROOT/images/NNN.name/*.jpg)")
    classes = _folder_classes(img)
    if len(classes) != 200:
        log.warning("CUB: expected 200 class folders in %s, found %d", img, len(classes))
    half = len(classes) // 2
    return {"train": classes[:half], "test": classes[half:]}


def _cars(root: str) -> dict[str, list]:
    _require_dir(root, "Cars196")
    annos = os.path.join(root, "cars_annos.mat")
    if os.path.isfile(annos):
        try:
            from scipy.io import loadmat
        except ImportError:  # pragma: no cover
            raise DataError("reading cars_annos.mat needs scipy (pip install scipy)") from None
        try:
            mat = loadmat(annos)["annotations"][0]
        except Exception as e:  # noqa: BLE001
            raise DataError(f"{annos}: cannot read the annotations ({e})") from None
        pairs = [(os.path.join(root, str(a[0][0])), str(int(a[5][0][0]))) for a in mat]
        classes = _group(pairs)
    else:
        folder = _folder_root(root)
        classes = _folder_classes(folder)
    half = len(classes) // 2
    return {"train": classes[:half], "test": classes[half:]}


def _sop(root: str) -> dict[str, list]:
    _require_dir(root, "Stanford Online Products")
    out = {}
    for split, fname in (("train", "Ebay_train.txt"), ("test", "Ebay_test.txt")):
        path = os.path.join(root, fname)
        lines = _read_lines(path)
        pairs = []
        for i, line in enumerate(lines[1:], start=2):  # header: image_id class_id super_class_id path
            parts = line.split()
            if len(parts) < 4:
                raise DataError(f"{path}:{i}: expected 'image_id class_id super_class_id path', got {line!r}")
            pairs.append((os.path.join(root, parts[3]), parts[1]))
        if not pairs:
            raise DataError(f"{path}: no images listed")
        out[split] = _group(pairs)
    return out


def _inshop(root: str) -> dict[str, list]:
    _require_dir(root, "In-Shop")
    path = os.path.join(root, "list_eval_partition.txt")
    lines = _read_lines(path)
    groups: dict[str, list[tuple[str, str]]] = {"train": [], "query": [], "gallery": []}
    for i, line in enumerate(lines[2:], start=3):  # line 1: count, line 2: header
        parts = line.split()
        if len(parts) < 3 or parts[2] not in groups:
            raise DataError(f"{path}:{i}: expected 'image_name item_id train|query|gallery', got {line!r}")
        groups[parts[2]].append((os.path.join(root, parts[0]), parts[1]))
    for k, v in groups.items():
        if not v:
            raise DataError(f"{path}: no '{k}' images listed")
    return {k: _group(v) for k, v in groups.items()}


def _folder(root: str, num_train: int | None) -> dict[str, list]:
    _require_dir(root, "image folder dataset")
    classes = _folder_classes(_folder_root(root))
    n = len(classes) // 2 if num_train is None else num_train
    if not 0 < n < len(classes):
        raise DataError(f"{root}: num_train_classes={n} leaves no train or no test classes "
                        f"({len(classes)} classes found)")
    return {"train": classes[:n], "test": classes[n:]}


def _omniglot(root: str) -> dict[str, list]:
    _require_dir(root, "Omniglot")
    out = {}
    for split, sub in (("train", "images_background"), ("test", "images_evaluation")):
        d = os.path.join(root, sub)
        _require_dir(d, f"Omniglot {split} (expected ROOT/{sub}/<alphabet>/<character>/*.png)")
        classes = []
        for alphabet in sorted(os.listdir(d)):
            ad = os.path.join(d, alphabet)
            if not os.path.isdir(ad):
                continue
            for ch in sorted(os.listdir(ad)):
                cd = os.path.join(ad, ch)
                if os.path.isdir(cd):
                    files = _images_in(cd)
                    if files:
                        classes.append((f"{alphabet}/{ch}", files))
        if not classes:
            raise DataError(f"{d}: no character folders with images found")
        out[split] = classes
    return out


_CACHE: dict[tuple, dict] = {}


def class_lists(data_config: Any) -> dict[str, list[tuple[str, list[str]]]]:
    """{split: [(class name, image paths)]} for the raw dataset splits (before the validation carve-out)."""
    d = _as_dict(data_config)
    name, root = d.get("dataset", "folder"), os.path.expanduser(str(d.get("root") or ""))
    key = (name, os.path.abspath(root) if root else "", d.get("num_train_classes"))
    if key in _CACHE:
        return _CACHE[key]
    if not root:
        raise DataError("no dataset root given; pass --data-root or set data.root")
    if name == "cub":
        out = _cub(root)
    elif name == "cars":
        out = _cars(root)
    elif name == "sop":
        out = _sop(root)
    elif name == "inshop":
        out = _inshop(root)
    elif name == "folder":
        out = _folder(root, d.get("num_train_classes"))
    elif name == "omniglot":
        out = _omniglot(root)
    else:
        raise DataError(f"unknown dataset {name!r}")
    _CACHE[key] = out
    return out


def split_classes(data_config: Any) -> dict[str, list[tuple[str, list[str]]]]:
    """Apply the validation carve-out and per-class caps: {train, val, test (, query, gallery)}."""
    d = _as_dict(data_config)
    raw = class_lists(d)
    train = list(raw["train"])
    val: list = []
    frac = float(d.get("val_fraction", 0.0) or 0.0)
    if d.get("select_on", "val") == "val" and frac > 0:
        n_val = max(2, int(round(frac * len(train))))  # retrieval metrics need >= 2 classes
        if n_val > len(train) - 2:
            raise DataError(f"val_fraction={frac} on {len(train)} training classes leaves no room for a validation "
                            "split of >= 2 classes and >= 2 training classes; lower it or set data.val_fraction=0")
        rng = np.random.default_rng(int(d.get("val_seed", 0)))
        held = set(rng.choice(len(train), size=n_val, replace=False).tolist())
        val = [c for i, c in enumerate(train) if i in held]
        train = [c for i, c in enumerate(train) if i not in held]
    out = {"train": train, "val": val}
    if "query" in raw:  # In-Shop: test = query + gallery
        out["query"], out["gallery"] = raw["query"], raw["gallery"]
        merged: dict[str, list[str]] = {}
        for c, files in raw["query"] + raw["gallery"]:
            merged.setdefault(c, []).extend(files)
        out["test"] = [(c, merged[c]) for c in sorted(merged, key=_natural_key)]
    else:
        out["test"] = raw["test"]
    cap = d.get("max_images_per_class")
    if cap:
        rng = np.random.default_rng(int(d.get("val_seed", 0)) + 1)
        out["train"] = [(c, sorted(rng.permutation(f)[:cap].tolist()) if len(f) > cap else f) for c, f in out["train"]]
    return out


def items_of(classes: list[tuple[str, list[str]]], label_of: dict[str, int] | None = None) -> Items:
    label_of = label_of or {c: i for i, (c, _) in enumerate(classes)}
    return [(p, label_of[c]) for c, files in classes for p in files]


def dataset_items(data_config: Any, split: str) -> Items:
    """(image path, class label) for ``split`` in train / val / test (In-Shop also query / gallery).

    The same split logic as training (public API, used by the exporter). Labels are contiguous
    0..C-1 in class order within the split; for In-Shop query/gallery they share one numbering
    (that of "test") so they can be compared.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    sc = split_classes(data_config)
    if split in ("query", "gallery"):
        if split not in sc:
            raise DataError(f"split {split!r} exists only for In-Shop")
        label_of = {c: i for i, (c, _) in enumerate(sc["test"])}
        return items_of(sc[split], label_of)
    return items_of(sc[split])


def training_classes(data_config: Any) -> list[tuple[str, list[str]]]:
    """Training classes after dropping those with fewer than ``min_images_per_class`` images (warned)."""
    d = _as_dict(data_config)
    classes = split_classes(d)["train"]
    min_n = int(d.get("min_images_per_class", 1) or 1)
    kept = []
    for c, files in classes:
        if len(files) < min_n:
            log.warning("class %r has %d image(s), fewer than min_images_per_class=%d: left out of training",
                        c, len(files), min_n)
        else:
            kept.append((c, files))
    if len(kept) < 2:
        raise DataError(f"fewer than 2 usable training classes in {d.get('root')}")
    return kept


def default_ks(dataset: str) -> tuple[int, ...]:
    """The Recall@K cut-offs the papers report for each dataset (training, export gate and reports use them)."""
    return {"sop": (1, 10, 100, 1000), "inshop": (1, 10, 20, 30, 40, 50)}.get(dataset, (1, 2, 4, 8))


def describe(data_config: Any) -> str:
    sc = split_classes(data_config)
    return ", ".join(f"{k} {len(v)} classes / {sum(len(f) for _, f in v)} images" for k, v in sc.items() if v)


__all__ = ["DataError", "DATASETS", "dataset_items", "split_classes", "class_lists", "training_classes", "items_of",
           "describe", "default_ks", "IMAGE_EXTENSIONS"]
