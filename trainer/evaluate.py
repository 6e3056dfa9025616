"""Evaluation: embed images through ``sdk.preprocess`` and score them with ``sdk.metrics``.

The same preprocessing and metric code run on the device, so a bundle cannot disagree with the
model it was exported from. Retrieval uses the L2-normalised backbone embedding only (the MPN is
dropped at test time, DESIGN §2).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from sdk.datasets import default_ks  # noqa: F401  (re-exported: one definition, shared with the exporter)
from sdk.preprocess import PreprocessConfig
from trainer.transforms import EvalDataset, collate

log = logging.getLogger(__name__)


def _as_embedder(model_or_embedder: Any) -> nn.Module:
    m = model_or_embedder
    if isinstance(m, nn.parallel.DistributedDataParallel):
        m = m.module
    m = getattr(m, "_orig_mod", m)  # torch.compile wrapper
    if hasattr(m, "inference_embedder"):
        return m.inference_embedder()
    if hasattr(m, "model") and hasattr(m.model, "inference_embedder"):  # trainer's TrainStep wrapper
        return m.model.inference_embedder()
    if isinstance(m, nn.Module):
        return m
    raise TypeError(f"expected an IBCModel or an nn.Module embedder, got {type(m).__name__}")


@torch.no_grad()
def embed_items(model_or_embedder: Any, items: list[tuple[str, int]], preprocess_config: PreprocessConfig | dict,
                batch_size: int = 128, *, num_workers: int = 0, device: str | torch.device | None = None,
                channels_last: bool = False, amp_dtype: torch.dtype | None = None,
                progress: bool = False, desc: str = "embed") -> tuple[np.ndarray, np.ndarray]:
    """Embed ``(path, label)`` items -> (float32 (N, D) L2-normalised embeddings, int64 (N,) labels).

    Unreadable images are skipped with a warning naming them (the arrays then have fewer rows).
    The model is put in eval mode for the pass and each module's previous mode restored.
    """
    if isinstance(preprocess_config, dict):
        preprocess_config = PreprocessConfig.from_dict(preprocess_config)
    if not items:
        raise ValueError("no images to embed")
    embedder = _as_embedder(model_or_embedder)
    if device is None:
        try:
            device = next(embedder.parameters()).device
        except StopIteration:
            device = torch.device("cpu")
    device = torch.device(device)
    modes = {m: m.training for m in embedder.modules()}  # restored per module afterwards
    embedder.eval()
    loader = DataLoader(EvalDataset(items, preprocess_config), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, collate_fn=collate, persistent_workers=False,
                        generator=torch.Generator().manual_seed(0))  # never draws from the global RNG
    embs, labels, oks = [], [], []
    it = loader
    if progress and sys.stderr.isatty():  # bars only on a terminal, never in a log file
        from tqdm import tqdm

        it = tqdm(loader, desc=desc, leave=False, unit="batch", dynamic_ncols=True)
    try:
        for x, y, _, ok in it:
            x = x.to(device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                e = embedder(x)
            e = torch.nn.functional.normalize(e.float(), dim=1)
            embs.append(e.cpu().numpy())
            labels.append(y.numpy())
            oks.append(ok.numpy())
    finally:
        for m, mode in modes.items():
            m.training = mode
    emb = np.concatenate(embs).astype(np.float32)
    lab = np.concatenate(labels).astype(np.int64)
    ok = np.concatenate(oks)
    if not ok.all():
        log.warning("evaluation: %d of %d images were unreadable and left out", int((~ok).sum()), len(ok))
    return emb[ok], lab[ok]


def evaluate_items(model: Any, items: list[tuple[str, int]], preprocess_config, *, gallery: list | None = None,
                   ks=(1, 2, 4, 8), nmi: bool = True, seed: int = 0, batch_size: int = 128, **embed_kw) -> dict:
    """Retrieval metrics of ``items`` (leave-one-out), or of query ``items`` against ``gallery``."""
    from sdk.metrics import evaluate

    q, ql = embed_items(model, items, preprocess_config, batch_size, **embed_kw)
    if gallery is None:
        return evaluate(q, ql, ks=ks, nmi=nmi, seed=seed)
    g, gl = embed_items(model, gallery, preprocess_config, batch_size, **embed_kw)
    return evaluate(q, ql, g, gl, ks=ks, nmi=nmi, seed=seed)


__all__ = ["embed_items", "evaluate_items", "default_ks"]
