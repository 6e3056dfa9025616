"""Retrieval metrics shared by the trainer and the edge SDK (DESIGN.md §4).

One implementation, used both when training and on the device, so a bundle can never
disagree with the model it came from. Semantics follow pytorch-metric-learning's
``AccuracyCalculator`` where it defines a metric (precision@1, R-precision, MAP@R, NMI,
lone-query exclusion, self-match removal by index); Recall@K is the papers' hit rate.

Torch-free on purpose: numpy + faiss only; sklearn is imported lazily for NMI, whose
k-means is ``sdk.kmeans`` (faiss.Kmeans's result, fewer searches).
Neighbours come from an exact faiss inner-product search over L2-normalised vectors,
run in query chunks so memory stays O(N·k) -- SOP-sized sets (60k × 60k) never build a
dense similarity matrix.
"""

from __future__ import annotations

import logging
from typing import Iterable, Mapping, Sequence

import faiss
import numpy as np

from .kmeans import kmeans

log = logging.getLogger(__name__)

DEFAULT_KS: tuple[int, ...] = (1, 2, 4, 8)
DEFAULT_CHUNK_SIZE = 8192
KMEANS_NITER = 20  # same as PML's default FaissKMeans(niter=20)
_NORM_EPS = 1e-12  # torch.nn.functional.normalize's eps, as PML's CosineSimilarity uses

__all__ = [
    "evaluate",
    "format_metrics",
    "l2_normalize",
    "knn_search",
    "boundary_tie_rows",
    "drop_self_matches",
    "relevant_counts",
    "hits_at_k",
    "r_precision_per_query",
    "average_precision_at_r",
    "cluster_assignments",
    "nmi_score",
]


# --------------------------------------------------------------------------- validation


def _as_embeddings(x, name: str) -> np.ndarray:
    """Coerce to a finite float32 (N, D) array, or say exactly what is wrong."""
    try:
        arr = np.asarray(x, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a numeric (N, D) array: {exc}") from exc
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (N, D) array, got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape})")
    if arr.shape[1] == 0:
        raise ValueError(f"{name} has zero-width embeddings (shape {arr.shape})")
    if not np.isfinite(arr).all():
        bad = int(np.count_nonzero(~np.isfinite(arr).all(axis=1)))
        raise ValueError(f"{name} contains NaN or inf values (in {bad} of {arr.shape[0]} rows)")
    return arr


def _as_labels(labels, n: int, name: str, emb_name: str) -> np.ndarray:
    """Labels must be a 1-D array with one entry per embedding."""
    if labels is None:
        raise ValueError(f"{name} is required")
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.shape[0] != n:
        raise ValueError(f"{name} has {arr.shape[0]} entries but {emb_name} has {n} rows")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or inf")
    return arr


def _check_ks(ks: Iterable[int]) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks:
        raise ValueError("ks must name at least one K")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"every K in ks must be a positive integer, got {k!r}")
    return tuple(int(k) for k in ks)


# --------------------------------------------------------------------------- pure helpers


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation (float32), so inner product == cosine similarity.

    Zero rows stay zero (eps clamp), as torch's ``F.normalize`` does.
    """
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, _NORM_EPS), dtype=np.float32)


def _chunk_bounds(n: int, chunk_size: int) -> list[tuple[int, int]]:
    """Query chunks; a short tail is merged into the previous chunk.

    faiss switches from its BLAS kernel to a scalar one below
    ``distance_compute_blas_threshold`` queries, and the two round differently; keeping
    every chunk above that threshold makes the result independent of the chunk size
    (and identical to one unchunked search, as PML does).
    """
    threshold = int(faiss.cvar.distance_compute_blas_threshold)
    size = max(int(chunk_size), threshold)
    bounds = [(s, min(s + size, n)) for s in range(0, n, size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < threshold:
        tail = bounds.pop()
        bounds[-1] = (bounds[-1][0], tail[1])
    return bounds


def _flat_ip_index(reference: np.ndarray) -> faiss.IndexFlatIP:
    index = faiss.IndexFlatIP(reference.shape[1])
    index.add(np.ascontiguousarray(reference, dtype=np.float32))
    return index


def _search_chunked(
    index: faiss.Index, query: np.ndarray, k: int, chunk_size: int
) -> tuple[np.ndarray, np.ndarray]:
    query = np.ascontiguousarray(query, dtype=np.float32)
    sims = np.empty((query.shape[0], k), dtype=np.float32)
    idx = np.empty((query.shape[0], k), dtype=np.int64)
    for start, stop in _chunk_bounds(query.shape[0], chunk_size):
        sims[start:stop], idx[start:stop] = index.search(query[start:stop], k)
    return sims, idx


def knn_search(
    query: np.ndarray,
    reference: np.ndarray,
    k: int,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product (faiss IndexFlatIP), searched chunk by chunk.

    Returns (similarities float32 (nq, k), indices int64 (nq, k)), best first, exactly
    as one unchunked faiss search would. Memory is O(nq·k), never nq × nr.
    """
    if not 1 <= k <= reference.shape[0]:
        raise ValueError(f"k={k} neighbours asked but the reference has {reference.shape[0]} items")
    return _search_chunked(_flat_ip_index(reference), query, k, chunk_size)


def boundary_tie_rows(sims: np.ndarray, k: int) -> np.ndarray:
    """Rows whose k-th and (k+1)-th similarities are exactly equal.

    faiss keeps exact ties at the cut-off of a top-k search in an order that depends on k
    (its heap admits a tie only while not full), so only for these rows can the first k
    columns of a wider search differ from a search with exactly k. Elsewhere the top-k
    set is unique and faiss orders it the same way for any k.
    """
    if sims.shape[1] <= k:
        return np.zeros(sims.shape[0], dtype=bool)
    return sims[:, k - 1] == sims[:, k]


def _topk_as_if_searched_with_k(
    index: faiss.Index,
    query: np.ndarray,
    sims: np.ndarray,
    idx: np.ndarray,
    k: int,
    chunk_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The first k columns of a wider search, made identical to a faiss search with k.

    PML searches with exactly its own k; matching it to the decimal when exact duplicate
    vectors tie means re-searching the (rare) rows with a tie at the cut-off. Those rows
    are padded with others up to faiss's BLAS threshold so they are computed by the same
    kernel as the first search.
    """
    sims_k, idx_k = sims[:, :k].copy(), idx[:, :k].copy()
    rows = np.flatnonzero(boundary_tie_rows(sims, k))
    if rows.size == 0:
        return sims_k, idx_k
    threshold = int(faiss.cvar.distance_compute_blas_threshold)
    need = min(threshold, query.shape[0]) - rows.size
    search_rows = rows
    if need > 0:
        others = np.setdiff1d(np.arange(query.shape[0]), rows)[:need]
        search_rows = np.concatenate([rows, others])
    s, i = _search_chunked(index, query[search_rows], k, chunk_size)
    sims_k[rows], idx_k[rows] = s[: rows.size], i[: rows.size]
    log.debug("re-searched %d rows with exact ties at k=%d", rows.size, k)
    return sims_k, idx_k


def drop_self_matches(
    sims: np.ndarray, idx: np.ndarray, self_index: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Remove each query's own index from its (k+1)-long neighbour row -> k columns.

    By index, not by dropping column 0: with duplicate vectors the query itself need not
    come first. A row that does not contain itself (more exact duplicates than k) loses
    its last column instead -- PML's ``return_results`` does the same.
    """
    is_self = idx == np.asarray(self_index)[:, None]
    is_self[~is_self.any(axis=1), -1] = True
    keep = ~is_self
    n, k = idx.shape
    return sims[keep].reshape(n, k - 1), idx[keep].reshape(n, k - 1)


def relevant_counts(
    query_labels: np.ndarray, reference_labels: np.ndarray, leave_one_out: bool
) -> np.ndarray:
    """R per query: how many *other* reference items share its class (0 = lone query)."""
    classes, counts = np.unique(reference_labels, return_counts=True)
    pos = np.searchsorted(classes, query_labels)
    pos_clipped = np.minimum(pos, len(classes) - 1)
    found = classes[pos_clipped] == query_labels
    r = np.where(found, counts[pos_clipped], 0).astype(np.int64)
    return r - 1 if leave_one_out else r


def hits_at_k(matches: np.ndarray, k: int) -> np.ndarray:
    """Recall@K per query as the papers define it: 1 if any of the K nearest is relevant."""
    return matches[:, :k].any(axis=1).astype(np.float64)


def _within_r(matches: np.ndarray, r: np.ndarray) -> np.ndarray:
    return np.arange(matches.shape[1])[None, :] < np.asarray(r)[:, None]


def r_precision_per_query(matches: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Fraction of the first R neighbours that are relevant (PML ``r_precision``)."""
    hits = np.count_nonzero(matches & _within_r(matches, r), axis=1)
    return hits / np.asarray(r, dtype=np.float64)


def average_precision_at_r(matches: np.ndarray, r: np.ndarray) -> np.ndarray:
    """AP@R per query (PML ``mean_average_precision_at_r`` before the mean).

    Sum of precision@i over the relevant positions i <= R, divided by R.
    """
    rel = matches & _within_r(matches, r)
    cum = np.cumsum(rel, axis=1, dtype=np.int64)
    ranks = np.arange(1, matches.shape[1] + 1, dtype=np.float64)
    return (cum * rel / ranks).sum(axis=1) / np.asarray(r, dtype=np.float64)


def cluster_assignments(
    embeddings: np.ndarray, n_clusters: int, seed: int = 0, niter: int = KMEANS_NITER
) -> np.ndarray:
    """Seeded k-means (faiss.Kmeans's algorithm and result); each row's cluster id (int64).

    Separate from ``nmi_score`` so tests can hand the same assignment to PML. All points
    are used (no faiss sub-sampling) so the result does not depend on N/k ratios.
    ``sdk.kmeans`` gives faiss.Kmeans's assignment (points within float32 rounding of two
    centroids aside, see there) but searches only the points whose nearest centroid can
    still change (~3x faster at SOP size).
    """
    return kmeans(embeddings, int(n_clusters), niter=int(niter), seed=int(seed)).assignments


def nmi_score(labels: np.ndarray, clusters: np.ndarray) -> float:
    """sklearn's normalized_mutual_info_score (arithmetic mean), as PML uses."""
    from sklearn.metrics import normalized_mutual_info_score  # lazy: optional dependency

    return float(normalized_mutual_info_score(np.asarray(labels), np.asarray(clusters)))


# --------------------------------------------------------------------------- public API


def evaluate(
    query,
    query_labels,
    reference=None,
    reference_labels=None,
    ks: Sequence[int] = DEFAULT_KS,
    nmi: bool = True,
    seed: int = 0,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    kmeans_niter: int = KMEANS_NITER,
) -> dict:
    """Retrieval metrics of embeddings under cosine similarity.

    ``reference=None`` is leave-one-out over the query set (each query's own index is
    removed from its neighbours). Queries whose class has no other member in the
    reference ("lone") are excluded from every kNN metric, as PML does; Recall@K,
    precision@1, R-precision and MAP@R are means over the remaining queries.
    NMI clusters the query set (seeded k-means, one cluster per query class).

    Returns ``recall@K`` per K, ``precision@1``, ``r_precision``, ``map@r``, ``nmi`` (if
    asked) as floats in [0, 1], and ``num_queries`` (all queries given) and
    ``num_lone_queries_excluded`` as ints. Raises ValueError on malformed input.
    """
    ks = _check_ks(ks)
    q = _as_embeddings(query, "query")
    q_labels = _as_labels(query_labels, q.shape[0], "query_labels", "query")
    leave_one_out = reference is None
    if leave_one_out:
        if reference_labels is not None:
            raise ValueError("reference_labels given without reference")
        r_emb, r_labels = q, q_labels
    else:
        r_emb = _as_embeddings(reference, "reference")
        r_labels = _as_labels(reference_labels, r_emb.shape[0], "reference_labels", "reference")
        if r_emb.shape[1] != q.shape[1]:
            raise ValueError(
                f"query has dimension {q.shape[1]} but reference has dimension {r_emb.shape[1]}"
            )
        kinds = {q_labels.dtype.kind, r_labels.dtype.kind}
        if len(kinds) > 1 and not kinds <= set("biuf"):
            raise ValueError(
                f"query_labels ({q_labels.dtype}) and reference_labels ({r_labels.dtype}) are not comparable"
            )

    n_classes = len(np.unique(q_labels)) if leave_one_out else len(np.unique(np.concatenate([q_labels, r_labels])))
    if n_classes < 2:
        raise ValueError("labels contain a single class; retrieval metrics need at least two")

    r_count = relevant_counts(q_labels, r_labels, leave_one_out)
    active = np.flatnonzero(r_count > 0)
    n_lone = int(q.shape[0] - active.size)
    if active.size == 0:
        raise ValueError(
            f"all {q.shape[0]} queries are lone: no query's class has another member in the reference"
        )

    n_ref = r_emb.shape[0]
    available = n_ref - 1 if leave_one_out else n_ref
    if max(ks) > available:
        raise ValueError(
            f"K={max(ks)} neighbours asked but the reference has {n_ref} items"
            + (" (leave-one-out: at most N-1 neighbours)" if leave_one_out else "")
        )
    # PML's k="max_bin_count": the largest R; a wider search serves Recall@K if needed.
    k_r = int(r_count.max())
    k_wide = max(k_r, max(ks))
    self_col = int(leave_one_out)
    log.info("kNN: %d queries (%d lone), %d references, k=%d", q.shape[0], n_lone, n_ref, k_wide)

    q_norm = l2_normalize(q)
    r_norm = q_norm if leave_one_out else l2_normalize(r_emb)
    index = _flat_ip_index(r_norm)
    # All queries are searched (lone ones too), so every row goes through the same faiss
    # kernel as in PML's single search; lone rows are dropped afterwards.
    sims, idx = _search_chunked(index, q_norm, k_wide + self_col, chunk_size)
    sims_r, idx_r = _topk_as_if_searched_with_k(index, q_norm, sims, idx, k_r + self_col, chunk_size)
    if leave_one_out:
        self_index = np.arange(q.shape[0])
        sims, idx = drop_self_matches(sims, idx, self_index)
        sims_r, idx_r = drop_self_matches(sims_r, idx_r, self_index)

    active_labels = q_labels[active][:, None]
    matches_r = r_labels[idx_r[active]] == active_labels
    matches_wide = r_labels[idx[active]] == active_labels
    r_active = r_count[active]
    out: dict = {}
    for kk in ks:  # the R-sized list is PML's; Recall@K reads it whenever it is long enough
        out[f"recall@{kk}"] = float(hits_at_k(matches_r if kk <= k_r else matches_wide, kk).mean())
    out["precision@1"] = float(matches_r[:, 0].mean())
    out["r_precision"] = float(r_precision_per_query(matches_r, r_active).mean())
    out["map@r"] = float(average_precision_at_r(matches_r, r_active).mean())

    if nmi:
        n_query_classes = len(np.unique(q_labels))
        if n_query_classes < 2:
            raise ValueError("NMI needs at least two classes in the query set; pass nmi=False")
        clusters = cluster_assignments(q_norm, n_query_classes, seed=seed, niter=kmeans_niter)
        out["nmi"] = nmi_score(q_labels, clusters)

    out["num_queries"] = int(q.shape[0])
    out["num_lone_queries_excluded"] = n_lone
    return out


_SHORT = {"precision@1": "P@1", "r_precision": "RP", "map@r": "MAP@R", "nmi": "NMI"}


def format_metrics(d: Mapping[str, float]) -> str:
    """One readable line for CLIs, e.g. ``R@1 81.40 | R@2 ... | MAP@R 45.10 | n=60000``."""
    parts = []
    for key, value in d.items():
        if key.startswith("recall@"):
            parts.append(f"R@{key.split('@', 1)[1]} {100 * value:.2f}")
        elif key in _SHORT:
            parts.append(f"{_SHORT[key]} {100 * value:.2f}")
    if "num_queries" in d:
        n = f"n={d['num_queries']}"
        lone = d.get("num_lone_queries_excluded", 0)
        parts.append(n + (f" ({lone} lone excluded)" if lone else ""))
    for key, value in d.items():  # anything unknown, so nothing is silently hidden
        if not (key.startswith("recall@") or key in _SHORT or key.startswith("num_")):
            parts.append(f"{key} {value:.4f}" if isinstance(value, float) else f"{key} {value}")
    return " | ".join(parts)
