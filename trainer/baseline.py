"""The zero-shot baseline: what the pretrained backbone gives with no training at all.

Why: a fine-tuned model is only worth shipping if it beats the free embedding it started from, so
every pretrained run reports this "starting point" beside its own numbers. The embedding is the
untrained trunk's pooled features (no head), scored with the same metrics on the same images.

It depends only on the weights, the pooling, the preprocessing and the images, so it is cached
(``$IBC_CACHE`` or ``~/.cache/ibc``) under a digest of exactly those: the seeds of a sweep share it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os

import torch

from trainer.config import Config
from trainer.evaluate import default_ks, evaluate_items
from trainer.engine import TrainingError, resolve_device, use_channels_last
from trainer.loop import split_items
from trainer.report import fmt_table

log = logging.getLogger("trainer")
KMEANS_SEED = 0  # NMI's k-means seed: fixed, so the starting point is one number whatever the run's seed


def _cache_dir() -> str:
    return os.environ.get("IBC_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ibc")


def _weights_identity(cfg: Config) -> dict:
    from models.backbones import get_backbone_spec

    spec = get_backbone_spec(cfg.model.backbone)
    given = cfg.model.pretrained if isinstance(cfg.model.pretrained, str) else None
    paths = [given] if given else spec.weights.candidates()
    path = next((p for p in paths if os.path.isfile(p)), None)
    if path is None:
        return {"path": None}
    st = os.stat(path)
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def cache_key(cfg: Config, split: str, items: list, gallery: list | None) -> str:
    ident = {"backbone": cfg.model.backbone, "pooling": cfg.model.pooling, "weights": _weights_identity(cfg),
             "preprocess": cfg.preprocess.to_dict(), "split": split, "items": items, "gallery": gallery,
             "ks": list(default_ks(cfg.data.dataset)), "nmi": cfg.runtime.nmi, "kmeans_seed": KMEANS_SEED}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:24]


def pretrained_baseline(cfg: Config, *, split: str = "test", device: torch.device | str = "cpu",
                        channels_last: bool = False, amp_dtype: torch.dtype | None = None,
                        use_cache: bool = True) -> dict:
    """Metrics of the untrained pretrained trunk (pooled features, no head) on ``split``."""
    from models.backbones import create_backbone

    if not cfg.model.pretrained:
        raise TrainingError("the zero-shot baseline needs pretrained weights: set model.pretrained=true")
    items, gallery = split_items(cfg.data, split)
    path = os.path.join(_cache_dir(), "baselines", cache_key(cfg, split, items, gallery) + ".json")
    if use_cache and os.path.isfile(path):
        try:
            with open(path) as f:
                cached = json.load(f)
            log.info("zero-shot baseline from the cache (%s)", path)
            return cached["metrics"]
        except (OSError, ValueError, KeyError):
            pass  # an unreadable cache entry is recomputed
    backbone = create_backbone(cfg.model.backbone, pooling=cfg.model.pooling, pretrained=cfg.model.pretrained)
    backbone.to(device).eval()
    if channels_last:
        backbone = backbone.to(memory_format=torch.channels_last)
    rt = cfg.runtime
    m = evaluate_items(backbone, items, cfg.preprocess, gallery=gallery, ks=default_ks(cfg.data.dataset),
                       nmi=rt.nmi, seed=KMEANS_SEED, batch_size=rt.eval_batch_size, num_workers=cfg.data.num_workers,
                       channels_last=channels_last, amp_dtype=amp_dtype, progress=rt.progress,
                       desc=f"baseline {split}")
    if use_cache:
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump({"metrics": m, "backbone": cfg.model.backbone, "split": split}, f)
            os.replace(tmp, path)
        except OSError as e:
            log.warning("could not cache the baseline (%s)", e)
    return m


def evaluate_baseline(cfg: Config, *, out_dir: str | None = None, split: str = "test", device: str = "auto",
                      use_cache: bool = True) -> dict:
    """``ibc-train --pretrained-baseline``: report (and save) the zero-shot metrics of the config's backbone."""
    if cfg.runtime.threads:
        torch.set_num_threads(cfg.runtime.threads)
    if cfg.data.root:
        cfg.data.root = os.path.abspath(os.path.expanduser(cfg.data.root))
    dev = resolve_device(device)
    m = pretrained_baseline(cfg, split=split, device=dev, channels_last=use_channels_last(cfg.runtime.channels_last, dev),
                            use_cache=use_cache)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "baseline_metrics.json"), "w") as f:
            json.dump({"baseline": {split: m, "backbone": cfg.model.backbone, "pooling": cfg.model.pooling,
                                    "preprocess": cfg.preprocess.to_dict()}}, f, indent=2)
    log.info("\n%s", fmt_table([("starting point (pretrained, untrained)", m)],
                                f"{split} classes ({cfg.data.dataset}), {cfg.model.backbone} ImageNet weights"))
    return m


__all__ = ["pretrained_baseline", "evaluate_baseline", "cache_key"]
