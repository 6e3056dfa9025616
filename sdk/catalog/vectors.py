"""Input checks shared by every index and store: vectors, positive integers, faiss's search call."""

from __future__ import annotations

from typing import Any

import numpy as np

from sdk.catalog.errors import CatalogError, VectorError


def faiss_module():
    import faiss  # lazy: importing the SDK must stay cheap

    return faiss


def faiss_search(index, q: np.ndarray, k: int, params=None) -> tuple[np.ndarray, np.ndarray]:
    """``index.search`` that survives ``faiss.contrib.torch_utils``.

    Importing that module (pytorch-metric-learning does) replaces every ``Index.search`` with a
    torch-aware wrapper that drops the ``params`` argument; the original stays as
    ``search_numpy``. Call the original when it exists, so per-query efSearch / nprobe and
    ID selectors keep working in any process.
    """
    search = getattr(index, "search_numpy", None) or index.search
    return search(q, k, params=params) if params is not None else search(q, k)


def rows_text(idx: np.ndarray, limit: int = 5) -> str:
    idx = [int(i) for i in idx[:limit]]
    return ", ".join(map(str, idx)) + (", ..." if len(idx) == limit else "")


def as_vectors(x: Any, dim: int, what: str = "vectors") -> np.ndarray:
    """Validate vectors and return an (n, dim) float32 C-contiguous, L2-normalised copy."""
    if isinstance(x, (list, tuple)) and len(x) == 0:
        return np.zeros((0, dim), np.float32)
    try:
        arr = np.asarray(x)
    except (ValueError, TypeError) as e:
        raise VectorError(f"{what}: not an array of numbers ({e})") from None
    if arr.dtype.kind != "f":
        raise VectorError(f"{what} must be floating point (float16/32/64), got dtype {arr.dtype}")
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise VectorError(f"{what} must be 1-D (one vector) or 2-D (n, {dim}), got shape {arr.shape}")
    if arr.shape[1] != dim:
        raise VectorError(f"{what} have dimension {arr.shape[1]}, the catalogue holds {dim}-d vectors")
    with np.errstate(over="ignore"):
        out = np.array(arr, dtype=np.float32, order="C", copy=True)
    finite = np.isfinite(out).all(axis=1)
    if not finite.all():
        raise VectorError(f"{what} contain NaN or inf at row(s) {rows_text(np.flatnonzero(~finite))}")
    norms = np.linalg.norm(out, axis=1)
    if (norms == 0).any():
        raise VectorError(f"{what} are all-zero at row(s) {rows_text(np.flatnonzero(norms == 0))}; cannot L2-normalise")
    out /= norms[:, None]
    return out


def positive_int(value: Any, name: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise CatalogError(f"{name} must be a positive integer, got {value!r}")
    return int(value)
