"""Indexing speed, taken apart: decoding + preprocessing alone, the model alone, and both together.

Why separately: when indexing is slower than the model, the report must say whether decoding
starves the model (then more decode workers or a cheaper decode help) or the model is the limit.
Each figure is images per second on the same sample of real images, on this machine.
"""

from __future__ import annotations

import time

import numpy as np


def decode_rate(retriever, paths: list[str], batch_size: int = 32) -> float:
    """Images/s of the Retriever's decode + preprocess pipeline alone (its worker pool, no model)."""
    t0 = time.perf_counter()
    n = 0
    for chunk in retriever._chunks(list(paths), batch_size):
        n += len(chunk)
    return n / max(time.perf_counter() - t0, 1e-9)


def model_rate(retriever, paths: list[str], batch_size: int = 32, repeats: int = 1) -> float:
    """Images/s of the runtime alone, on batches preprocessed beforehand (as the exporter measures it)."""
    from sdk.preprocess import preprocess_image

    prep = retriever.manifest.preprocess
    batches = [np.stack([preprocess_image(p, prep) for p in paths[s:s + batch_size]])
               for s in range(0, len(paths), batch_size)]
    retriever.runner.run(batches[0][:1])  # warm-up (first-run allocations, lazy compilation)
    t0 = time.perf_counter()
    n = 0
    for _ in range(repeats):
        for b in batches:
            retriever.runner.run(b)
            n += len(b)
    return n / max(time.perf_counter() - t0, 1e-9)


__all__ = ["decode_rate", "model_rate"]
