"""sdk.catalog: search results against numpy brute force, every index kind, removal, bad input, save/load."""

import json
import os

import numpy as np
import pytest

from sdk.catalog import (
    Catalog,
    CatalogError,
    CatalogFormatError,
    CatalogMismatchError,
    DuplicateIdError,
    UnknownIdError,
    VectorError,
    choose_index,
    parse_memory,
)

DIM = 32


def clustered(n, dim=DIM, clusters=40, seed=0, noise=0.3):
    """Unit vectors from a Gaussian mixture (approximate search is meaningful on these)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)] + noise * rng.standard_normal((n, dim)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def brute_force(db, q, k):
    s = q @ db.T
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, order, 1), order


def recall(found_ids, true_ids):
    return np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found_ids, true_ids)])


@pytest.fixture(scope="module")
def data():
    x = clustered(3000, seed=1)
    q = clustered(50, seed=2)
    return x, q


def test_flat_equals_brute_force_with_ids_and_metadata(data):
    x, q = data
    cat = Catalog(DIM, "flat")
    ids = [f"item-{i}" for i in range(len(x))]
    cat.add(x, ids=ids, metadata=[{"i": i, "tags": ["a", i % 3]} for i in range(len(x))])
    assert len(cat) == len(x) and cat.kind == "flat"
    true_s, true_i = brute_force(x, q, 10)
    hits = cat.search(q, k=10)
    assert [[h.id for h in row] for row in hits] == [[ids[j] for j in row] for row in true_i]
    np.testing.assert_allclose([[h.score for h in row] for row in hits], true_s, atol=1e-5)
    assert hits[0][0].metadata == {"i": int(true_i[0, 0]), "tags": ["a", int(true_i[0, 0]) % 3]}
    hits[0][0].metadata["i"] = -1  # callers get copies, the catalogue is unchanged
    assert cat.search(q[:1], k=1)[0][0].metadata["i"] == int(true_i[0, 0])
    # raw form: (scores, ids) arrays as faiss gives them
    scores, raw = cat.search_raw(q, k=10)
    assert scores.shape == raw.shape == (len(q), 10) and raw.dtype == object
    assert raw[3, 0] == hits[3][0].id


def test_vectors_are_normalised_and_threshold_cuts(data):
    x, q = data
    cat = Catalog(DIM, "flat")
    cat.add(x[:100] * 7.5)  # scaled: stored unit-norm, so scores are cosines
    hits = cat.search(x[:3] * 0.1, k=5)
    assert [h.id for h in (row[0] for row in hits)] == [0, 1, 2]
    assert all(abs(row[0].score - 1.0) < 1e-5 for row in hits)
    cut = cat.search(q, k=50, threshold=0.5)
    assert all(h.score >= 0.5 for row in cut for h in row)
    full = cat.search(q, k=50)
    assert [len(r) for r in cut] == [sum(h.score >= 0.5 for h in r) for r in full]


@pytest.mark.parametrize("kind,opts,min_recall", [
    ("hnsw", {"hnsw_m": 16, "ef_construction": 40}, 0.95),
    ("ivfpq", {"nlist": 16, "pq_m": 16}, 0.6),
])
def test_approximate_indexes_against_brute_force(data, kind, opts, min_recall):
    x, q = data
    cat = Catalog(DIM, kind, **opts)
    cat.add(x)
    assert cat.kind == kind
    _, true_i = brute_force(x, q, 10)
    got = cat.search_raw(q, k=10, ef_search=128, nprobe=16)[1]
    assert got.dtype == np.int64
    assert recall(got, true_i) >= min_recall
    # per-query parameters matter: a narrower search is not better than a wide one
    narrow = cat.search_raw(q, k=10, ef_search=10, nprobe=1)[1]
    assert recall(narrow, true_i) <= recall(got, true_i) + 1e-9


PROJECTED = {"hnsw_dims": 16}  # HNSW graph over a 16-d projection, exact re-rank


@pytest.mark.parametrize("kind,extra", [("flat", {}), ("hnsw", {}), ("hnsw", PROJECTED), ("ivfpq", {})])
def test_remove_never_returns_removed_and_ids_survive(data, kind, extra):
    x, q = data
    cat = Catalog(DIM, kind, nlist=16, pq_m=16, compact_fraction=0.5, **extra)
    cat.add(x)
    gone = list(range(0, len(x), 3))  # a third: below HNSW's compaction threshold
    assert cat.remove(gone) == len(gone)
    assert len(cat) == len(x) - len(gone)
    keep = np.setdiff1d(np.arange(len(x)), gone)
    hits = cat.search_raw(q, k=20, ef_search=200, nprobe=16)[1]
    assert not set(hits.ravel().tolist()) & set(gone)
    assert (hits >= 0).all()  # still k live hits per query
    if kind == "flat":  # exact on the remaining set
        _, true_i = brute_force(x[keep], q, 20)
        assert np.array_equal(hits, keep[true_i])
    # vectors of removed entries are not found even by themselves
    assert cat.search(x[gone[:5]], k=1, ef_search=64)[0][0].id not in gone
    with pytest.raises(UnknownIdError, match=r"not in the catalogue: \[0\]"):
        cat.remove([0, 1])
    assert len(cat) == len(x) - len(gone)  # nothing removed by the failed call
    assert cat.remove([0, 1], missing="ignore") == 1


def test_hnsw_compaction_rebuilds_and_stays_correct(data):
    x, q = data
    cat = Catalog(DIM, "hnsw", hnsw_m=16, compact_fraction=0.2)
    cat.add(x[:1000])
    cat.remove(list(range(100)))
    assert cat.info()["tombstones"] == 100
    cat.remove(list(range(100, 300)))  # 300 > 0.2 * 1000: rebuilt from live vectors
    assert cat.info()["tombstones"] == 0 and cat.index.faiss_index.ntotal == 700
    _, true_i = brute_force(x[300:1000], q, 5)
    assert recall(cat.search_raw(q, k=5, ef_search=200)[1], true_i + 300) >= 0.95
    new = cat.add(x[1000:1010])  # ids keep counting after the rebuild, never reused
    assert new == list(range(1000, 1010))


def test_auto_index_by_size_and_memory():
    assert choose_index(500, 512) == "flat"
    assert choose_index(30_000, 512, "64G") == "flat"
    assert choose_index(1_000_000, 512, "64G") == "hnsw"
    assert choose_index(1_000_000, 512, "1G") == "ivfpq"  # 2 GB of raw vectors do not fit
    assert choose_index(30_000, 512, "10M") == "ivfpq"
    assert parse_memory("512M") == 512 << 20 and parse_memory(1000) == 1000 and parse_memory(None) > 0
    with pytest.raises(CatalogError, match="max_memory"):
        parse_memory("lots")


def test_auto_migrates_as_the_catalogue_grows(monkeypatch, data):
    import sdk.catalog.catalog as C  # the module that owns the "auto" policy

    monkeypatch.setattr(C, "AUTO_FLAT_MAX", 1500)
    monkeypatch.setattr(C, "MIN_PQ_TRAIN", 500)
    x, q = data
    cat = Catalog(DIM, "auto", max_memory="8G", hnsw_m=16)
    cat.add(x[:1000], metadata=[{"i": i} for i in range(1000)])
    assert cat.kind == "flat"
    cat.remove([5])
    cat.add(x[1000:2000])  # crosses 1500: rebuilt as HNSW with the same ids
    assert cat.kind == "hnsw" and len(cat) == 1999
    hits = cat.search(x[[7, 1500]], k=1)
    assert (hits[0][0].id, hits[0][0].metadata, hits[1][0].id) == (7, {"i": 7}, 1500)
    assert 5 not in {h.id for row in cat.search(x[:20], k=20) for h in row}


def test_bad_input_is_named():
    cat = Catalog(8, "flat")
    good = np.eye(8, dtype=np.float32)
    with pytest.raises(VectorError, match="dimension 7.*8-d"):
        cat.add(np.ones((2, 7), np.float32))
    with pytest.raises(VectorError, match="floating point.*int64"):
        cat.add(np.ones((2, 8), np.int64))
    bad = good.copy()
    bad[3, 2] = np.nan
    with pytest.raises(VectorError, match=r"NaN or inf at row\(s\) 3"):
        cat.add(bad)
    with pytest.raises(VectorError, match="all-zero"):
        cat.add(np.zeros((1, 8), np.float32))
    with pytest.raises(VectorError, match="shape"):
        cat.add(np.ones((2, 2, 8), np.float32))
    with pytest.raises(DuplicateIdError, match="within the batch"):
        cat.add(good[:2], ids=["a", "a"])
    cat.add(good[:2], ids=["a", "b"])
    with pytest.raises(DuplicateIdError, match=r"already in the catalogue: \['b'\]"):
        cat.add(good[2:4], ids=["b", "c"])
    assert len(cat) == 2 and "c" not in cat  # all or nothing
    with pytest.raises(CatalogError, match="all str or all int"):
        cat.add(good[2:4], ids=["c", 3])
    with pytest.raises(CatalogError, match="uses str ids"):
        cat.add(good[2:4], ids=[3, 4])
    with pytest.raises(CatalogError, match="pass ids"):
        cat.add(good[2:4])
    with pytest.raises(CatalogError, match="str or int, got float"):
        cat.add(good[2:3], ids=[1.5])
    with pytest.raises(CatalogError, match="2 ids for 1 items"):
        cat.add(good[2:3], ids=["x", "y"])
    with pytest.raises(CatalogError, match="not JSON-serialisable"):
        cat.add(good[2:3], ids=["x"], metadata=[{"f": object()}])
    with pytest.raises(CatalogError, match="must be a dict"):
        cat.add(good[2:3], ids=["x"], metadata=["label"])
    for k in (0, -3, 2.5, True):
        with pytest.raises(CatalogError, match="k must be a positive integer"):
            cat.search(good[:1], k=k)
    with pytest.raises(VectorError, match="query vectors have dimension 4"):
        cat.search(np.ones(4, np.float32))
    with pytest.raises(CatalogError, match="index must be one of"):
        Catalog(8, "annoy")
    with pytest.raises(CatalogError, match="ef_search must be a positive integer"):
        cat.search(good[:1], ef_search=0)


def test_k_larger_than_catalogue_and_empty_catalogue():
    cat = Catalog(4, "flat")
    q = np.eye(4, dtype=np.float32)[:2]
    assert cat.search(q, k=3) == [[], []]
    scores, ids = cat.search_raw(q, k=3)
    assert np.isneginf(scores).all() and (ids == -1).all()
    cat.add(np.eye(4, dtype=np.float32)[:2], ids=[10, 20])
    hits = cat.search(q, k=5)
    assert [[h.id for h in row] for row in hits] == [[10, 20], [20, 10]]
    scores, ids = cat.search_raw(q, k=5)
    assert ids.tolist() == [[10, 20, -1, -1, -1], [20, 10, -1, -1, -1]]
    assert np.isneginf(scores[:, 2:]).all()
    assert cat.add(np.eye(4, dtype=np.float32)[2:]) == [21, 22]  # auto ids continue after the largest
    cat.remove([10, 20, 21, 22])
    assert len(cat) == 0 and cat.search(q, k=1) == [[], []]


def low_rank(n, dim=DIM, rank=6, seed=0, noise=0.05):
    """Unit vectors near a ``rank``-dim subspace: the structure trained embeddings have."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(np.random.default_rng(99).standard_normal((dim, rank)))[0].T
    x = rng.standard_normal((n, rank)) @ basis + noise * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_projected_hnsw_finds_neighbours_with_exact_scores():
    import faiss

    x, q = low_rank(3000, seed=1), low_rank(50, seed=2)
    cat = Catalog(DIM, "hnsw", hnsw_m=16, hnsw_dims=8, compact_fraction=0.2)
    cat.add(x[:2000])
    cat.add(x[2000:])  # later adds go through the projection learned on the first
    assert isinstance(faiss.downcast_index(cat.index.faiss_index.index), faiss.IndexRefine)
    true_s, true_i = brute_force(x, q, 10)
    scores, got = cat.search_raw(q, k=10, ef_search=64)
    assert recall(got, true_i) >= 0.95
    # the re-rank scores are the exact cosines of the hits, best first
    np.testing.assert_allclose(scores, np.take_along_axis(q @ x.T, got.astype(np.int64), 1), atol=1e-5)
    assert (np.diff(scores, axis=1) <= 1e-7).all()
    # tombstones are translated through the id map below the re-rank
    cat.remove(list(range(0, 3000, 7)))
    hits = cat.search_raw(q, k=10, ef_search=64)[1]
    assert (hits >= 0).all() and not (hits.astype(np.int64) % 7 == 0).any()
    cat.remove(list(range(1, 3000, 7)) + list(range(2, 3000, 7)))  # past compact_fraction: rebuilt
    assert cat.info()["tombstones"] == 0
    assert isinstance(faiss.downcast_index(cat.index.faiss_index.index), faiss.IndexRefine)
    keep = np.array([i for i in range(3000) if i % 7 > 2])
    _, true_i = brute_force(x[keep], q, 10)
    assert recall(cat.search_raw(q, k=10, ef_search=64)[1], keep[true_i]) >= 0.95


def test_projected_hnsw_bad_settings_are_named():
    with pytest.raises(CatalogError, match="hnsw_dims=64 is more than the vectors' dimension 32"):
        Catalog(DIM, "hnsw", hnsw_dims=64)
    with pytest.raises(CatalogError, match="projection to 16 dims needs at least 16 vectors"):
        Catalog(DIM, "hnsw", hnsw_dims=16).add(low_rank(10))
    with pytest.raises(CatalogError, match="refine_factor"):
        Catalog(DIM, "hnsw", hnsw_dims=16, refine_factor=0)


def test_ivfpq_needs_training_data():
    with pytest.raises(CatalogError, match="needs at least 256 vectors"):
        Catalog(DIM, "ivfpq").add(clustered(100))


@pytest.mark.parametrize("kind,extra", [("flat", {}), ("hnsw", {}), ("hnsw", PROJECTED), ("ivfpq", {})])
def test_save_load_round_trip(tmp_path, data, kind, extra):
    x, q = data
    model = {"manifest_digest": "abc", "embedding_dim": DIM, "preprocess": {"crop": 32}}
    cat = Catalog(DIM, kind, model=model, nlist=16, pq_m=16, hnsw_m=16, compact_fraction=0.9, **extra)
    ids = [f"id{i}" for i in range(len(x))]
    cat.add(x, ids=ids, metadata=[{"n": i} if i % 2 else None for i in range(len(x))])
    cat.remove(ids[:10])
    before = cat.search(q, k=7, ef_search=50, nprobe=4)
    out = cat.save(tmp_path / "cat")
    assert sorted(os.listdir(tmp_path)) == [".cat.lock", "cat"]  # no temp leftovers (the lock file stays)
    back = Catalog.load(out, model=model)
    assert back.kind == kind and len(back) == len(cat) and back.ids() == cat.ids()
    assert back.search(q, k=7, ef_search=50, nprobe=4) == before
    assert back.add(x[:1], ids=["new"]) == ["new"] and "new" in back
    with pytest.raises(CatalogMismatchError, match="built with model abc.*bundle given is model zzz"):
        Catalog.load(out, model={**model, "manifest_digest": "zzz"})


def test_partial_tampered_and_foreign_catalogues_are_refused(tmp_path, data):
    x, _ = data
    cat = Catalog(DIM, "flat")
    cat.add(x[:50])
    out = cat.save(tmp_path / "cat")
    # a crash during save leaves the old catalogue whole
    import sdk.catalog.persistence as P

    real = P.sha256_of
    P.sha256_of = lambda f: (_ for _ in ()).throw(OSError("disk gone"))
    try:
        cat.add(x[50:60])
        with pytest.raises(OSError, match="disk gone"):
            cat.save(out)
    finally:
        P.sha256_of = real
    assert len(Catalog.load(out)) == 50 and sorted(os.listdir(tmp_path)) == [".cat.lock", "cat"]
    # tampered / missing files
    with open(os.path.join(out, "entries.jsonl"), "a") as f:
        f.write('[999,999,null]\n')
    with pytest.raises(CatalogFormatError, match="entries.jsonl.*SHA-256"):
        Catalog.load(out)
    os.remove(os.path.join(out, "index.faiss"))
    with pytest.raises(CatalogFormatError, match="index.faiss: missing"):
        Catalog.load(out)
    os.remove(os.path.join(out, "catalog.json"))
    with pytest.raises(CatalogFormatError, match="no catalog.json.*partial write"):
        Catalog.load(out)
    # unknown schema
    out2 = cat.save(tmp_path / "cat2")
    header = json.loads(open(os.path.join(out2, "catalog.json")).read())
    header["schema_version"] = 7
    open(os.path.join(out2, "catalog.json"), "w").write(json.dumps(header))
    with pytest.raises(CatalogFormatError, match="schema version 7"):
        Catalog.load(out2)
    # refuses to overwrite a folder that is not a catalogue
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes(b"x")
    with pytest.raises(CatalogError, match="not a catalogue"):
        cat.save(tmp_path / "photos")
    assert (tmp_path / "photos" / "a.jpg").exists()


# ------------------------------------------------------------------------- certified int8 exact scan
@pytest.fixture
def small_scan(monkeypatch):
    """Make the int8 scan kick in on test-sized catalogues, with several blocks and a partial last one."""
    import sdk.catalog.int8_scan as C

    if not C.int8_scan_available():
        pytest.skip("onnxruntime not installed")
    monkeypatch.setattr(C, "INT8_MIN_ENTRIES", 500)
    monkeypatch.setattr(C.Int8ExactScan, "BLOCK", 1024)
    return C


def uniform(n, dim, seed):
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("seven_bit", [False, True])
def test_int8_scan_is_exact_on_clustered_uniform_and_spiky_vectors(small_scan, monkeypatch, seven_bit):
    if seven_bit:  # the AVX2-without-VNNI code path
        monkeypatch.setattr(small_scan, "int8_dot_exact", lambda: False)
    x = np.concatenate([clustered(2500, dim=64, clusters=30, seed=3), uniform(2500, 64, 4)])
    x[[10, 3000]] = 0
    x[10, 5] = x[3000, 7] = 1.0  # quantise badly: handled as outliers, scored exactly
    q = np.concatenate([clustered(40, dim=64, clusters=30, seed=5), uniform(40, 64, 6), x[[10, 3000]]])
    cat = Catalog(64, "flat")
    cat.add(x[:3000])
    cat.search(q[:1], k=1)  # builds the scan
    cat.add(x[3000:])  # appended to the scan incrementally
    scores, ids = cat.search_raw(q, k=10)
    true_s, true_i = brute_force(x, q, 10)
    assert np.array_equal(ids, true_i)
    np.testing.assert_allclose(scores, true_s, atol=1e-5)
    stats = cat.info()["exact_scan"]
    assert stats["queries"] == len(q) + 1 and stats["outliers"] >= 2
    # 7-bit codes when forced, and also on the natural path of a CPU without VNNI (AVX2 only)
    assert cat.index._scan.code_max == (63 if seven_bit or not small_scan.int8_dot_exact() else 127)
    cat.remove([0, 1, 2, 3000])  # tombstones: masked in the scan, which is kept (not rebuilt)
    assert cat.info()["exact_scan"]["queries"] == len(q) + 1
    keep = np.setdiff1d(np.arange(len(x)), [0, 1, 2, 3000])
    _, true_i = brute_force(x[keep], q, 10)
    assert np.array_equal(cat.search_raw(q, k=10)[1], keep[true_i])


def test_int8_scan_falls_back_when_it_cannot_certify(small_scan, monkeypatch):
    # near-ties everywhere (uniform, high-dimensional) and few candidates: certification must fail
    monkeypatch.setattr(small_scan.Int8ExactScan, "KPRIME", 10)
    monkeypatch.setattr(small_scan.Int8ExactScan, "KPRIME_WIDE", 12)
    x, q = uniform(3000, 256, 7), uniform(30, 256, 8)
    cat = Catalog(256, "flat")
    cat.add(x)
    _, ids = cat.search_raw(q, k=10)
    assert cat.info()["exact_scan"]["uncertified_fallbacks"] > 0
    assert np.array_equal(ids, brute_force(x, q, 10)[1])


def test_int8_bound_holds_for_every_pair(small_scan):
    """The certification rests on |q.x - approx| <= eps; check it on all pairs of a sample."""
    x, q = np.concatenate([clustered(1500, dim=48, seed=9), uniform(500, 48, 10)]), uniform(64, 48, 11)
    scan = small_scan.Int8ExactScan.build(x, np.arange(len(x)))
    codes = np.concatenate([b for b in scan.blocks], axis=1)[:, : scan.n].astype(np.int64)
    aq = np.abs(q).max(axis=1) / 127.0
    q8 = np.rint(q / aq[:, None])
    e_q = np.linalg.norm(q - q8 * aq[:, None], axis=1)
    approx = (q8.astype(np.int64) @ codes) * aq[:, None] * scan.scale
    err = np.abs(q.astype(np.float64) @ x.T.astype(np.float64) - approx)
    eps = scan.emax + e_q * (1 + scan.emax) + 1e-5
    inliers = np.setdiff1d(np.arange(len(x)), scan.outliers)
    assert (err[:, inliers] <= eps[:, None]).all()
    assert err.max() > 0 and eps.max() < 0.1  # a real, non-vacuous bound


def test_embedded_int8_graph_is_what_it_claims():
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    from sdk.catalog import INT8_TOPK_ONNX

    g = helper.make_graph(
        [helper.make_node("MatMulInteger", ["q", "xt", "zp"], ["s"]),
         helper.make_node("TopK", ["s", "k"], ["values", "indices"], axis=1, largest=1, sorted=0)],
        "int8_topk",
        [helper.make_tensor_value_info("q", TensorProto.UINT8, ["n", "d"]),
         helper.make_tensor_value_info("xt", TensorProto.INT8, ["d", "N"]),
         helper.make_tensor_value_info("k", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("values", TensorProto.INT32, ["n", "kk"]),
         helper.make_tensor_value_info("indices", TensorProto.INT64, ["n", "kk"])],
        initializer=[numpy_helper.from_array(np.array(128, np.uint8), "zp")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], producer_name="ibc-sdk")
    m.ir_version = 8
    assert m.SerializeToString() == INT8_TOPK_ONNX
    onnx.checker.check_model(onnx.load_from_string(INT8_TOPK_ONNX))
