"""sdk.metrics against pytorch-metric-learning's AccuracyCalculator and loop-written references.

PML is the definition of precision@1 / R-precision / MAP@R / NMI (DESIGN.md §4), so it is
compared to 1e-6; Recall@K (a hit rate PML does not have) is checked against plain loops.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # works with or without an editable install
    sys.path.insert(0, str(ROOT))

import faiss  # noqa: E402

from sdk import metrics  # noqa: E402
from sdk.metrics import (  # noqa: E402
    average_precision_at_r,
    cluster_assignments,
    drop_self_matches,
    evaluate,
    format_metrics,
    hits_at_k,
    knn_search,
    l2_normalize,
    nmi_score,
    r_precision_per_query,
    relevant_counts,
)

TOL = 1e-6
KNN_KEYS = {"precision@1": "precision_at_1", "r_precision": "r_precision", "map@r": "mean_average_precision_at_r"}


# --------------------------------------------------------------------------- data


def clustered(seed: int, n_classes: int = 30, dim: int = 16, sizes=(1, 9), noise: float = 1.2):
    """Gaussian blobs with uneven class sizes (singletons included -> lone queries)."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(sizes[0], sizes[1], n_classes)
    labels = np.repeat(np.arange(n_classes), counts)
    centres = rng.normal(size=(n_classes, dim))
    x = centres[labels] + rng.normal(scale=noise, size=(len(labels), dim))
    perm = rng.permutation(len(labels))
    return x[perm].astype(np.float32), labels[perm]


def with_duplicates(x: np.ndarray, labels: np.ndarray, seed: int, cross_label: bool = True):
    """Exact duplicate vectors.

    cross_label=True also copies vectors across classes and piles 12 copies together, so
    some queries do not find themselves among their k+1 nearest and faiss's (k-dependent)
    tie order decides the metrics; cross_label=False keeps duplicates inside a class, where
    tie order cannot change any metric.
    """
    rng = np.random.default_rng(seed + 100)
    x = x.copy()
    if not cross_label:
        for c in np.unique(labels)[:10]:
            members = np.flatnonzero(labels == c)
            x[members[1:]] = x[members[0]]
        return x, labels
    n = len(x)
    src = rng.choice(n, 20, replace=False)
    dst = rng.choice(n, 20, replace=False)
    x[dst] = x[src]
    pile = rng.choice(n, 12, replace=False)
    x[pile] = x[pile[0]]
    return x, labels


def pml_accuracy(query, query_labels, reference=None, reference_labels=None, clusters=None, l2=False):
    """PML on the same normalised float32 vectors; IndexFlatIP so both use the same kernel."""
    torch = pytest.importorskip("torch")
    acc = pytest.importorskip("pytorch_metric_learning.utils.accuracy_calculator")
    from pytorch_metric_learning.utils.inference import FaissKNN

    include = ["precision_at_1", "r_precision", "mean_average_precision_at_r"]
    kwargs = {}
    if clusters is not None:
        include.append("NMI")
        kwargs["kmeans_func"] = lambda x, n: torch.as_tensor(clusters)
    knn = FaissKNN() if l2 else FaissKNN(index_init_fn=faiss.IndexFlatIP)
    calc = acc.AccuracyCalculator(
        include=tuple(include), k="max_bin_count", device=torch.device("cpu"), knn_func=knn, **kwargs
    )
    ref = None if reference is None else l2_normalize(reference)
    return calc.get_accuracy(l2_normalize(query), query_labels, ref, reference_labels)


def assert_matches_pml(ours: dict, pml: dict):
    for key, pml_key in KNN_KEYS.items():
        assert abs(ours[key] - pml[pml_key]) <= TOL, (key, ours[key], pml[pml_key])


def lone_mask_loop(query_labels, reference_labels, leave_one_out):
    out = []
    for i, lab in enumerate(query_labels):
        others = [j for j, r in enumerate(reference_labels) if r == lab and not (leave_one_out and j == i)]
        out.append(len(others) == 0)
    return np.array(out)


def loop_reference(query, query_labels, reference=None, reference_labels=None, ks=(1, 2, 4, 8)):
    """Every metric written as plain per-query loops over a float64 similarity row."""
    loo = reference is None
    if loo:
        reference, reference_labels = query, query_labels
    qn = query / np.linalg.norm(query, axis=1, keepdims=True)
    rn = reference / np.linalg.norm(reference, axis=1, keepdims=True)
    recall = {k: [] for k in ks}
    p1, rp, ap = [], [], []
    lone = lone_mask_loop(query_labels, reference_labels, loo)
    for i in range(len(query)):
        if lone[i]:
            continue
        sims = rn.astype(np.float64) @ qn[i].astype(np.float64)
        order = [j for j in np.argsort(-sims, kind="stable") if not (loo and j == i)]
        rel = [reference_labels[j] == query_labels[i] for j in order]
        r = sum(1 for j, lab in enumerate(reference_labels) if lab == query_labels[i] and not (loo and j == i))
        for k in ks:
            recall[k].append(1.0 if any(rel[:k]) else 0.0)
        p1.append(float(rel[0]))
        rp.append(sum(rel[:r]) / r)
        hits, s = 0, 0.0
        for pos in range(r):
            if rel[pos]:
                hits += 1
                s += hits / (pos + 1)
        ap.append(s / r)
    out = {f"recall@{k}": float(np.mean(v)) for k, v in recall.items()}
    out.update({"precision@1": float(np.mean(p1)), "r_precision": float(np.mean(rp)), "map@r": float(np.mean(ap))})
    out["num_lone_queries_excluded"] = int(lone.sum())
    return out


# --------------------------------------------------------------------------- vs PML


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_leave_one_out_matches_pml(seed):
    x, y = with_duplicates(*clustered(seed), seed)
    ours = evaluate(x, y, nmi=False)
    assert ours["num_lone_queries_excluded"] > 0  # the data really has lone queries
    assert_matches_pml(ours, pml_accuracy(x, y))


@pytest.mark.parametrize("seed", [3, 4])
def test_separate_reference_matches_pml(seed):
    x, y = with_duplicates(*clustered(seed, n_classes=40), seed)
    rng = np.random.default_rng(seed)
    is_query = rng.random(len(y)) < 0.4
    is_query[y == y[0]] = True  # a class with no reference member -> lone queries
    q, qy, r, ry = x[is_query], y[is_query], x[~is_query], y[~is_query]
    r[:5] = q[:5]  # duplicates across the two sets
    ours = evaluate(q, qy, r, ry, nmi=False)
    assert ours["num_lone_queries_excluded"] > 0  # classes missing from the reference
    assert ours["num_queries"] == len(q)
    assert_matches_pml(ours, pml_accuracy(q, qy, r, ry))


def test_matches_pml_default_l2_knn():
    """PML's default FaissKNN (L2) on normalised vectors ranks as cosine does."""
    x, y = clustered(5)
    assert_matches_pml(evaluate(x, y, nmi=False), pml_accuracy(x, y, l2=True))


def test_nmi_matches_pml_given_same_clustering():
    x, y = clustered(6)
    ours = evaluate(x, y, nmi=True, seed=3)
    clusters = cluster_assignments(l2_normalize(x), len(np.unique(y)), seed=3)
    pml = pml_accuracy(x, y, clusters=clusters)
    assert abs(ours["nmi"] - pml["NMI"]) <= TOL
    assert_matches_pml(ours, pml)


# --------------------------------------------------------------------------- vs loops


@pytest.mark.parametrize("seed", [7, 8])
def test_all_metrics_match_loop_reference_leave_one_out(seed):
    x, y = with_duplicates(*clustered(seed, n_classes=20), seed, cross_label=False)
    ours = evaluate(x, y, nmi=False)
    ref = loop_reference(x, y)
    for key, value in ref.items():
        assert abs(ours[key] - value) <= TOL, (key, ours[key], value)


def test_all_metrics_match_loop_reference_separate():
    x, y = clustered(9, n_classes=25)
    q, qy, r, ry = x[:60], y[:60], x[60:], y[60:]
    ours = evaluate(q, qy, r, ry, ks=(1, 3, 10), nmi=False)
    ref = loop_reference(q, qy, r, ry, ks=(1, 3, 10))
    for key, value in ref.items():
        assert abs(ours[key] - value) <= TOL, (key, ours[key], value)


def test_recall_at_1_equals_precision_at_1_and_is_monotone():
    x, y = clustered(10)
    out = evaluate(x, y, ks=(1, 2, 4, 8, 16), nmi=False)
    assert out["recall@1"] == out["precision@1"]
    recalls = [out[f"recall@{k}"] for k in (1, 2, 4, 8, 16)]
    assert recalls == sorted(recalls)
    assert all(0.0 <= v <= 1.0 for k, v in out.items() if not k.startswith("num_"))


def test_perfect_embedding_scores_one():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(10), 4)
    x = np.eye(10)[y] * 5 + rng.normal(scale=1e-3, size=(40, 10))
    out = evaluate(x.astype(np.float32), y, ks=(1, 3), nmi=True)
    for key in ("recall@1", "recall@3", "precision@1", "r_precision", "map@r", "nmi"):
        assert out[key] == pytest.approx(1.0)


# --------------------------------------------------------------------------- chunking


@pytest.mark.parametrize("chunk", [1, 7, 25, 64, 10_000])
def test_chunk_size_does_not_change_result(chunk):
    x, y = with_duplicates(*clustered(11), 11)
    assert evaluate(x, y, nmi=False, chunk_size=chunk) == evaluate(x, y, nmi=False, chunk_size=10**9)


def test_search_is_chunked_and_memory_bounded(monkeypatch):
    """No faiss call sees more than one chunk of queries; outputs are (N, k), never N × N."""
    seen = []
    real = faiss.IndexFlatIP

    class Spy(real):
        def search(self, q, k, *args, **kwargs):
            seen.append((q.shape[0], k))
            return real.search(self, q, k, *args, **kwargs)

    monkeypatch.setattr(metrics.faiss, "IndexFlatIP", Spy)
    x, y = clustered(12, n_classes=60)
    chunk = 32
    sims, idx = knn_search(l2_normalize(x), l2_normalize(x), 5, chunk_size=chunk)
    assert sims.shape == idx.shape == (len(x), 5)
    threshold = int(faiss.cvar.distance_compute_blas_threshold)
    assert len(seen) >= len(x) // (chunk + threshold)
    assert sum(n for n, _ in seen) == len(x)
    assert max(n for n, _ in seen) < max(chunk, threshold) + threshold


def test_chunk_bounds_cover_range_without_tiny_tail():
    threshold = int(faiss.cvar.distance_compute_blas_threshold)
    for n, size in [(1, 5), (19, 5), (100, 30), (101, 50), (1000, 1), (45, 40)]:
        bounds = metrics._chunk_bounds(n, size)
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        if n >= threshold:
            assert all(e - s >= threshold for s, e in bounds)


# --------------------------------------------------------------------------- pure helpers


def test_drop_self_by_index_not_first_column():
    idx = np.array([[3, 0, 5], [1, 2, 4], [7, 8, 9]])
    sims = idx.astype(np.float32) / 10
    s, i = drop_self_matches(sims, idx, np.array([0, 1, 2]))
    # row 0: self at column 1; row 1: self first; row 2: self absent -> last column dropped
    np.testing.assert_array_equal(i, [[3, 5], [2, 4], [7, 8]])
    np.testing.assert_allclose(s, i / 10)


def test_relevant_counts_and_lone():
    q = np.array([0, 1, 2, 5])
    r = np.array([0, 0, 1, 2, 2, 2])
    np.testing.assert_array_equal(relevant_counts(q, r, leave_one_out=False), [2, 1, 3, 0])
    np.testing.assert_array_equal(relevant_counts(r, r, leave_one_out=True), [1, 1, 0, 2, 2, 2])


def test_hits_rprecision_and_ap_at_r_by_hand():
    m = np.array([[1, 0, 1, 0], [0, 1, 1, 1], [0, 0, 0, 1]], dtype=bool)
    r = np.array([2, 3, 1])
    np.testing.assert_array_equal(hits_at_k(m, 1), [1, 0, 0])
    np.testing.assert_array_equal(hits_at_k(m, 2), [1, 1, 0])
    np.testing.assert_allclose(r_precision_per_query(m, r), [1 / 2, 2 / 3, 0])
    # AP@R only counts relevant items within the first R positions
    np.testing.assert_allclose(average_precision_at_r(m, r), [1 / 2, (1 / 2 + 2 / 3) / 3, 0])


def test_knn_search_best_first_and_same_as_one_faiss_call():
    x, _ = with_duplicates(*clustered(16), 16)
    xn = l2_normalize(x)
    sims, idx = knn_search(xn, xn, 9, chunk_size=21)
    assert np.all(np.diff(sims, axis=1) <= 0)
    index = faiss.IndexFlatIP(xn.shape[1])
    index.add(xn)
    d, i = index.search(xn, 9)
    np.testing.assert_array_equal(idx, i)
    np.testing.assert_array_equal(sims, d)


@pytest.mark.parametrize("k", [1, 2, 3, 5, 8])
def test_narrow_view_equals_faiss_search_with_that_k_despite_ties(k):
    """faiss breaks exact ties at the cut-off differently for different k; the narrow view
    of a wide search must still equal what a search with exactly k returns (PML's)."""
    rng = np.random.default_rng(k)
    base = l2_normalize(rng.normal(size=(3, 8)))
    x = np.concatenate([base[rng.integers(0, 3, 60)], l2_normalize(rng.normal(size=(60, 8)))])
    x = x[rng.permutation(len(x))]
    index = metrics._flat_ip_index(x)
    wide_s, wide_i = metrics._search_chunked(index, x, 20, chunk_size=50)
    assert metrics.boundary_tie_rows(wide_s, k).any()  # the case under test really occurs
    narrow_s, narrow_i = metrics._topk_as_if_searched_with_k(index, x, wide_s, wide_i, k, 50)
    d, i = index.search(x, k)
    np.testing.assert_array_equal(narrow_i, i)
    np.testing.assert_array_equal(narrow_s, d)


def test_boundary_tie_rows():
    s = np.array([[0.9, 0.5, 0.5], [0.9, 0.8, 0.5], [0.7, 0.7, 0.7]], dtype=np.float32)
    np.testing.assert_array_equal(metrics.boundary_tie_rows(s, 2), [True, False, True])
    np.testing.assert_array_equal(metrics.boundary_tie_rows(s, 1), [False, False, True])
    assert not metrics.boundary_tie_rows(s, 3).any()


def test_l2_normalize_keeps_zero_rows():
    out = l2_normalize(np.array([[3, 4], [0, 0]], dtype=np.float64))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[0.6, 0.8], [0, 0]])


def test_clustering_is_seeded_and_nmi_in_range():
    x, y = clustered(13)
    xn = l2_normalize(x)
    a = cluster_assignments(xn, 30, seed=1)
    assert a.shape == (len(x),) and a.min() >= 0 and a.max() < 30
    np.testing.assert_array_equal(a, cluster_assignments(xn, 30, seed=1))
    assert 0.0 <= nmi_score(y, a) <= 1.0
    assert nmi_score(y, y) == pytest.approx(1.0)
    assert evaluate(x, y, seed=1)["nmi"] == evaluate(x, y, seed=1)["nmi"]


def test_format_metrics_one_line():
    x, y = clustered(14)
    line = format_metrics(evaluate(x, y, nmi=True))
    assert "\n" not in line
    for token in ("R@1", "R@8", "P@1", "RP", "MAP@R", "NMI", "n="):
        assert token in line


# --------------------------------------------------------------------------- bad input


def _xy():
    return clustered(15)


@pytest.mark.parametrize(
    "make_args, kwargs, message",
    [
        (lambda x, y: (np.zeros((0, 4), np.float32), np.zeros(0)), {}, "empty"),
        (lambda x, y: (x, y, np.zeros((0, x.shape[1]), np.float32), np.zeros(0)), {}, "empty"),
        (lambda x, y: (np.where(np.arange(len(x))[:, None] == 3, np.nan, x), y), {}, "NaN or inf"),
        (lambda x, y: (np.where(np.arange(len(x))[:, None] == 3, np.inf, x), y), {}, "NaN or inf"),
        (lambda x, y: (x, y, np.full_like(x, np.inf), y), {}, "NaN or inf"),
        (lambda x, y: (x, y[:-1]), {}, "entries but query has"),
        (lambda x, y: (x, y, x, y[:-2]), {}, "entries but reference has"),
        (lambda x, y: (x[:, 0], y), {}, "2-D"),
        (lambda x, y: (x[None], y), {}, "2-D"),
        (lambda x, y: (x, y, x[:, :-1], y), {}, "dimension"),
        (lambda x, y: (x, np.zeros_like(y)), {}, "single class"),
        (lambda x, y: (x, np.arange(len(y))), {}, "lone"),
        (lambda x, y: (x, y, x, y + 10_000), {}, "lone"),
        (lambda x, y: (x, y), {"ks": (1, 10_000)}, "the reference has"),
        (lambda x, y: (x, y, x[:5], y[:5]), {"ks": (1, 8)}, "the reference has 5 items"),
        (lambda x, y: (x, y[:, None]), {}, "1-D"),
        (lambda x, y: (x, y), {"ks": ()}, "at least one K"),
        (lambda x, y: (x, y), {"ks": (0, 1)}, "positive integer"),
        (lambda x, y: (x, y, x, None), {}, "reference_labels is required"),
        (lambda x, y: (x, y, None, y), {}, "without reference"),
    ],
)
def test_bad_input_raises_clear_value_error(make_args, kwargs, message):
    x, y = _xy()
    with pytest.raises(ValueError, match=message):
        evaluate(*make_args(x, y), nmi=False, **kwargs)


def test_k_too_large_message_names_sizes():
    x, y = _xy()
    with pytest.raises(ValueError, match=rf"K=500 neighbours asked but the reference has {len(x)} items"):
        evaluate(x, y, ks=(1, 500), nmi=False)


def test_nmi_needs_two_query_classes():
    x, y = _xy()
    q, qy = x[y == y[0]], y[y == y[0]]
    out = evaluate(q, qy, x, y, nmi=False)  # one query class is fine for retrieval
    assert out["num_queries"] == len(q)
    with pytest.raises(ValueError, match="NMI needs at least two classes"):
        evaluate(q, qy, x, y, nmi=True)


# --------------------------------------------------------------------------- layering


def test_import_does_not_pull_torch():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    code = "import sdk.metrics, sys; assert 'torch' not in sys.modules, 'torch imported'"
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_evaluate_does_not_pull_torch():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    code = (
        "import numpy as np, sys; from sdk.metrics import evaluate;"
        "x = np.random.default_rng(0).normal(size=(60, 8)).astype('float32');"
        "evaluate(x, np.arange(60) % 6, nmi=True);"
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
