"""Helpers for the trainer tests: tiny backbones, tiny image folders, and a subprocess entry point.

Run as a script (``python tests/_trainer_helpers.py OUT_JSON [ibc-train args...]``) it registers the
tiny backbones, optionally slows each step (``IBC_TEST_STEP_SLEEP``, so a test can kill it
mid-epoch), records the sample indices each process saw, and runs ``trainer.cli.main``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from torch import nn  # noqa: E402

from models.backbones import _REGISTRY, BackboneSpec, register_backbone  # noqa: E402


def _tiny_bn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())


def _tiny_nobn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())


def register_tiny_backbones() -> None:
    for name, builder in (("tiny_test", _tiny_bn), ("tiny_nobn_test", _tiny_nobn)):
        if name not in _REGISTRY:
            register_backbone(BackboneSpec(name, builder, lambda m: m, 16, weights=None))


def make_image_folder(root: Path, n_classes: int = 8, per_class: int = 6, size=(40, 48), seed: int = 0) -> Path:
    """``root/cNN/i.jpg``: each class a noisy version of its own colour (learnable, tiny)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(n_classes):
        d = root / f"c{c:02d}"
        d.mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 255, 3)
        for i in range(per_class):
            a = np.clip(base + rng.normal(0, 40, (size[0], size[1], 3)), 0, 255).astype(np.uint8)
            Image.fromarray(a).save(d / f"{i}.jpg", quality=90)
    return root


def tiny_overrides(root: Path, **extra) -> list[str]:
    """``--set`` overrides for a seconds-long run of a tiny model on a tiny folder."""
    base = {
        "data.dataset": "folder", "data.root": str(root), "data.num_train_classes": 4, "data.val_fraction": 0,
        "data.num_workers": 0, "model.backbone": "tiny_test", "model.embed_dim": 32, "model.mpn.num_heads": 2,
        "augment.size": 32, "preprocess.resize": 36, "preprocess.crop": 32, "sampler.classes_per_batch": 2,
        "sampler.images_per_class": 3, "optim.epochs": 2, "optim.lr": 1e-3, "optim.milestones": "[]",
        "runtime.progress": "false", "runtime.threads": 1, "runtime.eval_batch_size": 16, "runtime.nmi": "false",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def tiny_config(root: Path, **extra):
    from trainer.config import load_config

    return load_config(None, tiny_overrides(root, **extra))


def _main() -> None:
    register_tiny_backbones()
    record_path = sys.argv[1]
    sleep = float(os.environ.get("IBC_TEST_STEP_SLEEP", "0"))
    import time

    import trainer.loop as loop

    seen: list[list[int]] = []
    orig_collate = loop.collate

    def recording_collate(batch):
        out = orig_collate(batch)
        seen.append(out[2].tolist())
        return out

    loop.collate = recording_collate
    if sleep:
        orig_forward = loop.TrainStep.forward

        def slow_forward(self, images, labels):
            time.sleep(sleep)
            return orig_forward(self, images, labels)

        loop.TrainStep.forward = slow_forward
    orig_train = loop.train
    result_box = {}

    def recording_train(*a, **k):
        r = orig_train(*a, **k)
        result_box["mpn_batch_size"] = r.mpn_batch_size
        result_box["steps"] = r.steps
        return r

    import trainer.cli as cli

    loop.train = recording_train
    rank = int(os.environ.get("RANK", "0"))
    try:
        cli.main(sys.argv[2:], standalone_mode=False)
    finally:
        with open(f"{record_path}.rank{rank}.json", "w") as f:
            json.dump({"batches": seen, **result_box}, f)


if __name__ == "__main__":
    _main()
