"""Helpers for the export tests: a tiny real checkpoint and small image folders of real flowers.

The checkpoint is a resnet18 embedder (32-d) at 48x48 input, random weights with BatchNorm
statistics measured on real images (so activations have realistic ranges for int8
calibration). Image folders are symlinks to ../shared/data/flowers102 (never copied).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CROP, RESIZE, DIM = 48, 56, 32
SHARED = Path(os.environ.get("IBC_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
FLOWERS = SHARED / "flowers102" / "images"
TRAIN_CLASSES = ["001", "002", "003", "004", "005", "006"]
TEST_CLASSES = ["052", "060", "070", "077", "081", "089", "095", "102"]
VAL_CLASSES = ["010", "020", "030", "040"]
_CACHE: dict = {}


def require_flowers() -> Path:
    if not FLOWERS.is_dir():
        pytest.skip(f"flowers102 not found at {FLOWERS}")
    return FLOWERS


def link_classes(dst: Path, classes: list[str], per_class: int) -> Path:
    """DIR/<class>/<image> of symlinks to the first ``per_class`` real images of each class."""
    src = require_flowers()
    for c in classes:
        (dst / c).mkdir(parents=True, exist_ok=True)
        for f in sorted((src / c).glob("*.jpg"))[:per_class]:
            link = dst / c / f.name
            if not link.exists():
                link.symlink_to(f)
    return dst


def solid_images(dst: Path, n: int = 12) -> Path:
    """Flat images of the normalisation mean: a deliberately useless calibration set.

    Why the mean colour: normalised, every input is ~0, so int8 input ranges collapse and real
    images saturate. Flat images of varied colours were not broken enough: on an AVX2-only EPYC
    their int8 variant of the near-chance test model gained R@1 by chance and passed the gate.
    """
    dst.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (64, 64), (124, 116, 104)).save(dst / f"flat_{i:02d}.png")
    return dst


def near_duplicates(dst: Path, per_class: int = 6) -> Path:
    """DIR/<class>/ of slightly cropped and brightened copies of one real image per test class.

    Why: the random-weight test model is near chance on real classes (R@1 ~19 % on the parity
    images), so a broken int8 variant's R@1 moves by chance and can even gain (it did on an AVX-512
    VNNI EPYC). On near-duplicates the fp32 reference finds every copy (R@1 100 %), so a broken
    variant loses far past any tolerance on every CPU (measured: -56 to -58 points for U8S8 and S8S8).
    """
    from PIL import ImageEnhance

    for c in TEST_CLASSES:
        (dst / c).mkdir(parents=True, exist_ok=True)
        with Image.open(sorted((require_flowers() / c).glob("*.jpg"))[0]) as im:
            im = im.convert("RGB")
        w, h = im.size
        for i in range(per_class):
            d = 4 * i
            copy = ImageEnhance.Brightness(im.crop((d, d, w - d, h - d))).enhance(1.0 + 0.04 * (i - 3))
            copy.save(dst / c / f"copy_{i}.jpg", quality=90)
    return dst


def make_checkpoint(path: Path, data_root: Path | None = None, crop: int = CROP, resize: int = RESIZE,
                    dim: int = DIM, backbone: str = "resnet18") -> Path:
    import torch

    from models import IBCModel, ModelConfig
    from models.checkpoint import save_checkpoint
    from sdk.preprocess import PreprocessConfig, preprocess_batch

    torch.manual_seed(0)
    cfg = ModelConfig(backbone=backbone, embed_dim=dim, num_classes=len(TRAIN_CLASSES), use_mpn=True)
    model = IBCModel(cfg)
    prep = PreprocessConfig(resize=resize, crop=crop)
    files = [f for c in TRAIN_CLASSES for f in sorted((require_flowers() / c).glob("*.jpg"))[:6]]
    x = torch.from_numpy(preprocess_batch(files, prep))
    for m in model.modules():  # cumulative BatchNorm statistics over real images
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(x, use_mpn=False)
    config = {"preprocess": prep.to_dict()}
    if data_root is not None:
        config["data"] = {"dataset": "folder", "root": str(data_root), "num_train_classes": len(TRAIN_CLASSES),
                          "val_fraction": 0.34, "val_seed": 0, "select_on": "val"}
    save_checkpoint(str(path), {"model_config": cfg.to_dict(), "model": model.state_dict(), "config": config,
                                "epoch": 0, "step": 0})
    return path


def export_workspace(tmp_path_factory) -> dict:
    """One shared workspace per test session: checkpoint + calibration / parity / validation folders."""
    if "ws" not in _CACHE:
        root = tmp_path_factory.mktemp("export-ws")
        ws = {
            "root": root,
            "calib": link_classes(root / "calib", TRAIN_CLASSES, 4),
            "parity": link_classes(root / "parity", TEST_CLASSES, 6),
            "val": link_classes(root / "val", VAL_CLASSES, 6),
        }
        ws["ckpt"] = make_checkpoint(root / "tiny.pt")
        _CACHE["ws"] = ws
    return _CACHE["ws"]


def reference_embeddings(ckpt: Path, files: list[Path]) -> np.ndarray:
    import torch

    from export.source import load_source
    from sdk.preprocess import preprocess_batch

    src = load_source(str(ckpt))
    with torch.no_grad():
        return src.embedder(torch.from_numpy(preprocess_batch(files, src.preprocess))).numpy()


def exported_onnx(tmp_path_factory) -> dict:
    """The workspace checkpoint exported to fp32 ONNX once per session, with preprocessed image sets
    and the PyTorch reference embeddings of the parity images."""
    if "onnx" not in _CACHE:
        import torch

        from export.images import PreprocessedImages, folder_set
        from export.onnx_export import export_onnx
        from export.source import load_source

        ws = export_workspace(tmp_path_factory)
        work = tmp_path_factory.mktemp("onnx")
        src = load_source(str(ws["ckpt"]))
        path = export_onnx(src.embedder, str(work / "model.fp32.onnx"), src.image_size, src.embedding_dim)
        calib = PreprocessedImages(folder_set(ws["calib"], "calibration", labelled=False), src.preprocess, str(work),
                                   progress=False)
        parity = PreprocessedImages(folder_set(ws["parity"], "parity"), src.preprocess, str(work), progress=False)
        with torch.no_grad():
            ref = src.embedder(torch.from_numpy(parity.first(len(parity)))).numpy()
        _CACHE["onnx"] = {"work": work, "fp32": path, "calib": calib, "parity": parity, "ref": ref, "src": src}
    return _CACHE["onnx"]
