"""Lloyd's k-means that gives faiss.Kmeans's result, searching only where it can change.

NMI clusters the evaluation set into as many clusters as it has classes (11,316 for SOP),
and with faiss.Kmeans every iteration is a full nearest-centroid search of every point:
~2.8 s at 60k × 11k × 512 on two cores, 21 searches for 20 iterations. But after the
first two updates almost every cluster keeps exactly its members, and a centroid whose
members did not change is bit-for-bit the same vector. A point then needs a new search only
if its own centroid moved, or one of the few moved centroids may now be nearer.

This module runs the same algorithm as faiss's ``Clustering`` (CPU, L2, no sub-sampling):
initial centroids are the first k rows of ``faiss.rand_perm(n, seed + 1)``, each update
sums members in float32 in row order and scales by ``1 / count``, and empty clusters are
split from a large one with faiss's own RandomGenerator(1234) and ±1/1024 perturbation.
The assignment step keeps, per point, its squared distance to its centroid (upper bound)
and a lower bound on its squared distance to every other centroid. A point is not searched
when the two are separated by more than the float32 rounding of faiss's distances (a
γ_d bound), so faiss would make the same choice; the others go through faiss's own search.

The result is faiss.Kmeans's, point for point, except where a point has two nearest
centroids within float32 rounding of each other. There the pick depends on which faiss
kernel computed the distances (faiss chooses kernels by batch shape and k; its k=1 search
may break an exact tie between duplicate centroids either way, ours takes the lower
index), and once one point differs, later updates may differ a little too. Either pick
is a correct k-means step. faiss also stops early when its float32 objective repeats
exactly; with points still moving that needs degenerate data (exact duplicates sitting
on their centroids). On the SOP-sized benchmark the assignment is identical to
faiss.Kmeans's at ~1/3 of the time (bench/RESULTS.md); tests/test_kmeans.py compares
the two.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

__all__ = ["KMeansResult", "kmeans"]

_SPLIT_EPS = 1.0 / 1024.0  # faiss's perturbation when it splits a cluster
_SPLIT_SEED = 1234  # faiss re-seeds its split RNG with this on every update
_ROW_CHUNK = 8192


@dataclass(frozen=True)
class KMeansResult:
    """Final assignment (to the final centroids) and what the run cost.

    ``searched_rows[i]`` is how many points went through a full nearest-centroid search in
    assignment pass i (pass 0 is the initial one, the last is the final assignment); faiss
    searches all n points in every pass.
    """

    assignments: np.ndarray  # (n,) int64
    centroids: np.ndarray  # (k, d) float32
    updates: int  # centroid updates run (< niter when assignments stopped changing)
    splits: int  # empty clusters re-seeded by splitting, over all updates
    searched_rows: tuple[int, ...]


def _rounding_margin(d: int, sq_norms_x: np.ndarray, max_sq_norm_c: float) -> np.ndarray:
    """Per-point bound on the float32 error of a squared distance ||x||² + ||c||² - 2x·c.

    γ_d = d·u / (1 - d·u) bounds a d-term float32 dot product's relative error; the sum of
    the three terms is bounded by 2·(||x||² + ||c||²). Doubled again so that both faiss's
    value and ours are covered.
    """
    u = np.finfo(np.float32).eps / 2
    gamma = d * u / (1 - d * u)
    return 4.0 * gamma * (sq_norms_x + max_sq_norm_c) + 1e-12


def _initial_centroids(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    perm = np.empty(x.shape[0], dtype=np.int32)
    faiss.rand_perm(faiss.swig_ptr(perm), x.shape[0], seed + 1)
    return x[perm[:k]].copy()


def _member_sums(x: np.ndarray, assign: np.ndarray, clusters: np.ndarray, k: int) -> np.ndarray:
    """float32 sums of the members of ``clusters``, added in row order as faiss does."""
    slot = np.full(k, -1, dtype=np.int64)
    slot[clusters] = np.arange(clusters.size)
    rows = np.flatnonzero(slot[assign] >= 0)
    sums = np.zeros((clusters.size, x.shape[1]), dtype=np.float32)
    np.add.at(sums, slot[assign[rows]], x[rows])  # sequential: same rounding as faiss's loop
    return sums


def _split_empty_clusters(centroids: np.ndarray, counts: np.ndarray, n: int) -> tuple[np.ndarray, int]:
    """faiss's split_clusters: every empty cluster takes a perturbed copy of a large one.

    Returns the indices of the centroids it changed (both halves of each split) and the
    number of splits.
    """
    k, d = centroids.shape
    empty = np.flatnonzero(counts == 0)
    if empty.size == 0:
        return empty, 0
    rng = faiss.RandomGenerator(_SPLIT_SEED)
    up = np.where(np.arange(d) % 2 == 0, np.float32(1 + _SPLIT_EPS), np.float32(1 - _SPLIT_EPS))
    down = np.where(np.arange(d) % 2 == 0, np.float32(1 - _SPLIT_EPS), np.float32(1 + _SPLIT_EPS))
    denom = float(np.float32(n - k))
    changed = []
    for ci in empty:
        cj = 0
        while not rng.rand_float() < (float(counts[cj]) - 1.0) / denom:
            cj = (cj + 1) % k
        centroids[ci] = centroids[cj] * up
        centroids[cj] = centroids[cj] * down
        counts[ci] = counts[cj] / np.float32(2)
        counts[cj] -= counts[ci]
        changed += [ci, cj]
    return np.unique(np.asarray(changed, dtype=np.int64)), int(empty.size)


def _sq_dist_to(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Squared distances of each row of x to the matching row of c, in float64."""
    diff = x.astype(np.float64) - c
    return np.einsum("ij,ij->i", diff, diff)


def _min_sq_dist_to_moved(
    x: np.ndarray, sq_norms_x: np.ndarray, centroids: np.ndarray, moved: np.ndarray, assign: np.ndarray
) -> np.ndarray:
    """Each point's smallest squared distance to a moved centroid other than its own."""
    cm = centroids[moved]
    cm_sq = np.einsum("ij,ij->i", cm, cm, dtype=np.float64)
    best = np.empty(x.shape[0])
    for s in range(0, x.shape[0], _ROW_CHUNK):
        e = min(s + _ROW_CHUNK, x.shape[0])
        d2 = sq_norms_x[s:e, None] + cm_sq[None, :] - 2.0 * (x[s:e] @ cm.T)
        d2[moved[None, :] == assign[s:e, None]] = np.inf
        best[s:e] = d2.min(axis=1)
    return np.maximum(best, 0.0)


class _Assigner:
    """Nearest and second-nearest centroid per point, kept between updates."""

    def __init__(self, x: np.ndarray):
        self.x = x
        self.sq_norms = np.einsum("ij,ij->i", x, x, dtype=np.float64)
        self.index = faiss.IndexFlatL2(x.shape[1])
        n = x.shape[0]
        self.assign = np.zeros(n, dtype=np.int64)
        self.upper = np.zeros(n)  # squared distance to the own centroid (or above it)
        self.lower = np.zeros(n)  # squared distance to any other centroid is at least this

    def search(self, centroids: np.ndarray, rows: np.ndarray | None = None) -> int:
        """faiss's exact top-2 search for ``rows`` (all when None); returns how many."""
        rows = np.arange(self.x.shape[0]) if rows is None else rows
        if rows.size == 0:  # every point decided by its bounds: no index to refill
            return 0
        self.index.reset()
        self.index.add(centroids)
        dist, idx = self.index.search(self.x[rows], 2)
        tie = dist[:, 0] == dist[:, 1]  # duplicate centroids: the lower index, always
        idx[tie, 0] = np.minimum(idx[tie, 0], idx[tie, 1])
        self.assign[rows], self.upper[rows], self.lower[rows] = idx[:, 0], dist[:, 0], dist[:, 1]
        return int(rows.size)

    def update(self, centroids: np.ndarray, moved: np.ndarray) -> int:
        """Re-assign after ``moved`` centroids changed; search only undecided points."""
        if moved.size == 0:
            return 0
        rows = np.flatnonzero(np.isin(self.assign, moved))
        for s in range(0, rows.size, _ROW_CHUNK):  # chunked: float64 copies stay small
            part = rows[s : s + _ROW_CHUNK]
            self.upper[part] = _sq_dist_to(self.x[part], centroids[self.assign[part]])
        lower = np.minimum(
            self.lower, _min_sq_dist_to_moved(self.x, self.sq_norms, centroids, moved, self.assign)
        )
        cn = np.einsum("ij,ij->i", centroids, centroids, dtype=np.float64).max()
        margin = _rounding_margin(self.x.shape[1], self.sq_norms, float(cn))
        decided = self.upper + margin < lower - margin
        self.lower = np.where(decided, lower, self.lower)
        return self.search(centroids, np.flatnonzero(~decided))


def kmeans(x, k: int, *, niter: int = 20, seed: int = 1234, full_search_fraction: float = 0.25) -> KMeansResult:
    """Cluster the rows of ``x`` into ``k`` clusters, as ``faiss.Kmeans(d, k, niter=niter,
    seed=seed)`` without sub-sampling, followed by a search of every point, would.

    ``full_search_fraction``: when more than this fraction of the centroids moved (the
    first updates), every point is searched; below it, only the points the bounds leave
    undecided are.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"k-means needs a non-empty (N, D) array, got shape {x.shape}")
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"cannot make {k} clusters from {n} points")
    if niter < 0:
        raise ValueError(f"niter must be >= 0, got {niter}")
    if not 0.0 <= full_search_fraction <= 1.0:
        raise ValueError(f"full_search_fraction must be in [0, 1], got {full_search_fraction}")
    assigner = _Assigner(x)
    if k == n:  # faiss's corner case: the points are the centroids, no iteration
        centroids = x.copy()
        searched = assigner.search(centroids)
        return KMeansResult(assigner.assign.copy(), centroids, 0, 0, (searched,))

    centroids = _initial_centroids(x, k, seed)
    searched = [assigner.search(centroids)]
    changed_clusters = np.arange(k)
    prev_assign = assigner.assign.copy()
    updates = splits = 0
    while updates < niter and changed_clusters.size:
        counts = np.bincount(assigner.assign, minlength=k).astype(np.float32)
        new = centroids.copy()
        refill = changed_clusters[counts[changed_clusters] > 0]
        if refill.size:
            sums = _member_sums(x, assigner.assign, refill, k)
            new[refill] = sums * (np.float32(1) / counts[refill])[:, None]
        split, n_split = _split_empty_clusters(new, counts, n)
        splits += n_split
        updates += 1
        moved = np.flatnonzero((new != centroids).any(axis=1))
        centroids = new
        if moved.size > full_search_fraction * k:
            searched.append(assigner.search(centroids))
        else:
            searched.append(assigner.update(centroids, moved))
        # clusters that gained or lost a member, plus split ones (their count changed)
        diff = assigner.assign != prev_assign
        changed_clusters = np.union1d(
            np.union1d(assigner.assign[diff], prev_assign[diff]), split
        ).astype(np.int64)
        prev_assign = assigner.assign.copy()
    return KMeansResult(assigner.assign.copy(), centroids, updates, splits, tuple(searched))
