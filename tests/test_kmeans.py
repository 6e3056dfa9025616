"""sdk.kmeans against faiss.Kmeans itself: the same assignment, point for point.

faiss.Kmeans (no sub-sampling, then a search of every point, as PML's FaissKMeans does) is
the reference; ours must agree exactly while searching fewer points after the first
updates.
"""

from __future__ import annotations

import sys
from pathlib import Path

import faiss
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from sdk.kmeans import kmeans  # noqa: E402


def faiss_kmeans(x: np.ndarray, k: int, niter: int, seed: int) -> np.ndarray:
    km = faiss.Kmeans(
        x.shape[1], k, niter=niter, seed=seed, min_points_per_centroid=1,
        max_points_per_centroid=x.shape[0], verbose=False,
    )
    km.train(x)
    return km.index.search(x, 1)[1][:, 0]


def clustered(seed: int, n_classes: int = 150, per_class: int = 6, dim: int = 32, dup_every: int | None = 25):
    """Unit vectors around class centres; every ``dup_every``-th row duplicates its neighbour.

    Duplicates drawn together as initial centroids tie exactly, so one of the pair ends up
    empty and faiss's split of empty clusters is exercised.
    """
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, dim))
    x = np.repeat(centres, per_class, axis=0) + 0.6 * rng.normal(size=(n_classes * per_class, dim))
    if dup_every:
        x[1::dup_every] = x[::dup_every][: len(x[1::dup_every])]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x[rng.permutation(len(x))], dtype=np.float32)


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_matches_faiss_on_clustered_data_with_splits(seed):
    x = clustered(seed, dup_every=5)
    ours = kmeans(x, 150, niter=20, seed=seed)
    np.testing.assert_array_equal(ours.assignments, faiss_kmeans(x, 150, 20, seed))
    assert ours.splits > 0, "the data should make faiss split empty clusters"


@pytest.mark.parametrize("niter", [0, 1, 2, 5])
def test_matches_faiss_for_few_iterations(niter):
    x = clustered(3)
    ours = kmeans(x, 150, niter=niter, seed=11)
    np.testing.assert_array_equal(ours.assignments, faiss_kmeans(x, 150, niter, 11))
    assert ours.updates <= niter and len(ours.searched_rows) == ours.updates + 1


def test_matches_faiss_on_unclustered_data():
    """Uniform noise: assignments keep changing for many iterations, bounds are tight."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(1500, 16)).astype(np.float32)
    ours = kmeans(x, 60, niter=25, seed=2)
    np.testing.assert_array_equal(ours.assignments, faiss_kmeans(x, 60, 25, 2))
    assert ours.updates > 5


def test_centroids_are_faiss_centroids():
    x = clustered(4)
    km = faiss.Kmeans(32, 150, niter=20, seed=4, min_points_per_centroid=1, max_points_per_centroid=len(x))
    km.train(x)
    np.testing.assert_array_equal(kmeans(x, 150, niter=20, seed=4).centroids, km.centroids)


def test_later_passes_search_only_undecided_points():
    x = clustered(2)
    result = kmeans(x, 150, niter=20, seed=0)
    n = len(x)
    assert result.searched_rows[0] == n  # the first assignment searches everything
    passes = len(result.searched_rows)
    assert passes >= 4
    assert result.searched_rows[-1] < n // 4, result.searched_rows
    assert sum(result.searched_rows) < 0.75 * n * passes, result.searched_rows


def test_stops_when_assignments_settle_with_the_same_result():
    x = clustered(6)
    short = kmeans(x, 150, niter=20, seed=0)
    assert short.updates < 20  # converged early
    np.testing.assert_array_equal(short.assignments, kmeans(x, 150, niter=60, seed=0).assignments)


def test_one_point_per_cluster_is_the_identity_corner_case():
    x = clustered(8, n_classes=10, per_class=3, dup_every=None)
    np.testing.assert_array_equal(kmeans(x, len(x)).assignments, faiss_kmeans(x, len(x), 20, 1234))


@pytest.mark.parametrize(
    "x, k, niter, match",
    [
        (np.zeros((5, 3), np.float32), 6, 20, "cannot make 6 clusters from 5 points"),
        (np.zeros((5, 3), np.float32), 0, 20, "cannot make 0 clusters"),
        (np.zeros((0, 3), np.float32), 1, 20, "non-empty"),
        (np.zeros(5, np.float32), 1, 20, "non-empty"),
        (np.zeros((5, 3), np.float32), 2, -1, "niter"),
    ],
)
def test_bad_arguments_say_what_is_wrong(x, k, niter, match):
    with pytest.raises(ValueError, match=match):
        kmeans(x, k, niter=niter)


def test_full_search_fraction_is_checked_and_does_not_change_the_result():
    x = clustered(9)
    with pytest.raises(ValueError, match="full_search_fraction"):
        kmeans(x, 150, full_search_fraction=1.5)
    always_full = kmeans(x, 150, seed=3, full_search_fraction=0.0)
    assert set(always_full.searched_rows) <= {0, len(x)}
    np.testing.assert_array_equal(always_full.assignments, kmeans(x, 150, seed=3).assignments)
