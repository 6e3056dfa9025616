"""The Milvus store, against real components: Milvus Lite's embedded .db file and a Milvus Lite gRPC
server that a fixture starts on 127.0.0.1 (``milvus-lite server``) and stops. No mocks.

Answers are checked against the local exact catalogue (the same vectors in a flat Catalog)."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")

from sdk.catalog import (  # noqa: E402
    Catalog, CatalogError, CatalogMismatchError, DuplicateIdError, StoreError, UnknownIdError,
)
from sdk.catalog.milvus import MilvusStore, parse_store_uri  # noqa: E402

DIM = 32
MODEL = {"manifest_digest": "d" * 64, "embedding_dim": DIM, "preprocess": {"resize": 40, "crop": 32}}


def unit(n, dim=DIM, seed=0):
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(data_dir: Path, port: int) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("milvus-lite")
    proc = subprocess.Popen([str(exe), "server", "--data-dir", str(data_dir), "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"milvus-lite server exited: {proc.stderr.read().decode()[-2000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("milvus-lite server did not listen within 60 s")


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A Milvus Lite gRPC server on a free port of 127.0.0.1: yields (uri, data_dir, port)."""
    data = tmp_path_factory.mktemp("milvus-server")
    port = free_port()
    proc = start_server(data, port)
    yield f"http://127.0.0.1:{port}", data, port
    stop_server(proc)


_collections = iter(range(10_000))


def server_store(server, dim=DIM, **kw) -> MilvusStore:
    return MilvusStore(f"{server[0]}?collection=t{next(_collections)}", dim, model=MODEL, timeout=20, **kw)


def test_store_addresses_are_parsed_and_bad_ones_named():
    a = parse_store_uri("milvus:///data/cat.db?collection=flowers")
    assert (a.uri, a.collection, a.local) == ("/data/cat.db", "flowers", True)
    assert parse_store_uri("http://10.0.0.1:19530").uri == "http://10.0.0.1:19530"
    with pytest.raises(StoreError, match="not a store address"):
        parse_store_uri("/data/cat")
    with pytest.raises(StoreError, match="collection name"):
        parse_store_uri("http://h:1?collection=1-bad")


def test_embedded_file_answers_like_the_exact_catalogue_and_keeps_ids_and_metadata(tmp_path):
    x, q = unit(2000, seed=1), unit(40, seed=2)
    ids = [f"img-{i}" for i in range(len(x))]
    meta = [{"label": ["rose", "tulip", "daisy"][i % 3], "i": i, "tags": [i % 2, {"n": None}]} if i % 5 else None
            for i in range(len(x))]
    store = MilvusStore(f"milvus://{tmp_path}/cat.db", DIM, model=MODEL, index="flat", batch_size=300)
    assert store.add(x, ids=ids, metadata=meta) == ids and len(store) == len(x)
    local = Catalog(DIM, "flat")
    local.add(x, ids=ids, metadata=meta)
    s_scores, s_ids = store.search_raw(q, k=10)
    l_scores, l_ids = local.search_raw(q, k=10)
    assert (s_ids == l_ids).all()
    np.testing.assert_allclose(s_scores, l_scores, atol=1e-5)
    hits = store.search(q[:3], k=5)
    assert hits == [[(h.id, pytest.approx(h.score, abs=1e-5), h.metadata) for h in row] for row in local.search(q[:3], k=5)]
    assert store.metadata("img-7") == meta[7] and store.metadata("img-5") is None
    # filters pass through to Milvus
    roses = store.search(q, k=10, filter='label == "rose"')
    assert all(h.metadata["label"] == "rose" for row in roses for h in row) and all(len(r) == 10 for r in roses)
    # removal, unknown ids, k larger than the collection
    assert store.remove(ids[:100]) == 100 and len(store) == 1900
    assert not set(store.search_raw(x[:100], k=3)[1].ravel().tolist()) & set(ids[:100])
    with pytest.raises(UnknownIdError, match=r"not in the store: \['img-0'\]"):
        store.remove(["img-0", "img-100"])
    assert len(store) == 1900 and store.remove(["img-0", "img-100"], missing="ignore") == 1
    with pytest.raises(DuplicateIdError, match="already in the store: \\['img-200'\\]"):
        store.add(x[:1], ids=["img-200"])
    with pytest.raises(CatalogError, match="uses str ids"):
        store.add(x[:1], ids=[5])
    with pytest.raises(CatalogError, match="reserved by the Milvus store"):
        store.add(x[:1], ids=["z"], metadata=[{"vector": 1}])
    small = MilvusStore(f"milvus://{tmp_path}/cat.db?collection=small", DIM, model=MODEL)
    small.add(x[:3])
    scores, got = small.search_raw(q[:2], k=5)
    assert got[:, 3:].tolist() == [[-1, -1], [-1, -1]] and np.isneginf(scores[:, 3:]).all()
    assert small.add(x[3:5]) == [3, 4]  # automatic int ids continue
    assert len(small.search(q[:1], k=100)[0]) == 5
    info = store.info()
    assert info["entries"] == 1899 and info["index"] == "FLAT" and info["model"] == MODEL
    store.close()
    small.close()


def test_a_store_of_another_model_or_dimension_is_refused_in_one_line(tmp_path):
    uri = f"milvus://{tmp_path}/cat.db"
    MilvusStore(uri, DIM, model=MODEL).add(unit(5))
    with pytest.raises(CatalogMismatchError, match="holds 32-d vectors, the bundle gives 16-d"):
        MilvusStore(uri, 16, model={**MODEL, "embedding_dim": 16})
    with pytest.raises(CatalogMismatchError, match="built with model ddddddddddd.*bundle given is model eeeeeeeeee"):
        MilvusStore(uri, DIM, model={**MODEL, "manifest_digest": "e" * 64})
    with pytest.raises(StoreError, match="no catalogue collection 'other'"):
        MilvusStore(uri + "?collection=other", create=False)
    again = MilvusStore(uri, DIM, model=MODEL)
    assert len(again) == 5 and again.add(unit(1, seed=9)) == [5]


def test_unreachable_or_silent_servers_fail_in_one_line_within_the_timeout():
    port = free_port()  # nothing listens
    t0 = time.time()
    with pytest.raises(StoreError, match=rf"http://127.0.0.1:{port}: cannot reach the Milvus store"):
        MilvusStore(f"http://127.0.0.1:{port}", DIM, timeout=3)
    assert time.time() - t0 < 15
    silent = socket.socket()  # accepts connections, never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
    t0 = time.time()
    try:
        with pytest.raises(StoreError, match=f"{uri}: cannot reach"):
            MilvusStore(uri, DIM, timeout=3)
        assert time.time() - t0 < 20
    finally:
        silent.close()


def test_copy_local_to_milvus_and_back_loses_nothing(tmp_path):
    from sdk.catalog.copy import copy_catalogue

    x = unit(1500, seed=4)
    cat = Catalog(DIM, "hnsw", model=MODEL, hnsw_m=8)
    ids = list(range(1000, 2500))
    cat.add(x, ids=ids, metadata=[{"label": f"c{i % 7}", "score": i / 3} if i % 4 else None for i in range(len(x))])
    cat.remove(ids[:10])
    folder = cat.save(tmp_path / "local")
    uri = f"milvus://{tmp_path}/cat.db"
    assert copy_catalogue(folder, uri) == 1490
    back = tmp_path / "back"
    assert copy_catalogue(uri, str(back), index="hnsw") == 1490
    again = Catalog.load(back, model=MODEL)
    assert again.ids() == cat.ids() and again.model == cat.model and again.kind == "hnsw"
    assert all(again.metadata(u) == cat.metadata(u) for u in cat.ids())
    (a_ids, a_vecs), (c_ids, c_vecs) = again.vectors(), cat.vectors()
    assert a_ids == c_ids
    np.testing.assert_allclose(a_vecs, c_vecs, atol=1e-7)
    with pytest.raises(CatalogError, match="already holds 1490 entries"):
        copy_catalogue(folder, uri)
    with pytest.raises(FileExistsError):
        copy_catalogue(uri, str(back))


# --------------------------------------------------------------------------------------- server mode
def test_server_mode_search_remove_and_hnsw_params(server):
    x, q = unit(3000, seed=5), unit(30, seed=6)
    store = server_store(server, index="hnsw", hnsw_m=16, ef_construction=100)
    store.add(x, metadata=[{"label": ["rose", "tulip"][i % 2]} for i in range(len(x))])
    exact = np.argsort(-(q @ x.T), axis=1)[:, :10]
    got = store.search_raw(q, k=10, ef_search=200)[1]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got.tolist(), exact.tolist())])
    assert recall >= 0.95
    assert store.remove(list(range(0, 3000, 2))) == 1500 and len(store) == 1500
    hits = store.search(q, k=10, ef_search=200)
    assert all(h.id % 2 == 1 and h.metadata == {"label": "tulip"} for row in hits for h in row)
    assert store.info()["index"] == "HNSW"


@pytest.mark.slow
def test_server_mode_eight_searchers_and_one_writer_lose_and_duplicate_nothing(server):
    n0, batch, batches = 1000, 60, 8
    base, new = unit(n0, seed=7), unit(batch * batches, seed=8)
    store = server_store(server, index="flat", batch_size=30)
    store.timeout = 120.0  # Milvus Lite is pure Python: under 9 clients on 2 cores one call can take seconds
    store.add(base)
    removed = list(range(200))  # the writer removes the first batches * 10 of these
    errors, searches = [], [0] * 8
    done = threading.Event()

    def reader(t):
        rng = np.random.default_rng(t)
        try:
            while not done.is_set():
                i = int(rng.integers(200, n0))  # never removed
                hits = store.search(base[i:i + 1], k=10)[0]
                ids = [h.id for h in hits]
                if len(ids) != len(set(ids)):
                    errors.append(f"duplicates {ids}")
                if ids[0] != i:
                    errors.append(f"lost {i}: top {ids[0]}")
                searches[t] += 1
        except Exception as e:  # noqa: BLE001  (any failure is the finding)
            errors.append(f"reader {t}: {type(e).__name__}: {e}")

    def writer():
        try:
            for b in range(batches):
                store.add(new[b * batch:(b + 1) * batch], ids=list(range(n0 + b * batch, n0 + (b + 1) * batch)))
                store.remove(removed[b * 10:(b + 1) * 10])
                count = len(store)
                if count != n0 + (b + 1) * batch - (b + 1) * 10:
                    errors.append(f"len {count} after batch {b}")
        except Exception as e:  # noqa: BLE001
            errors.append(f"writer: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=reader, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    w = threading.Thread(target=writer)
    w.start()
    w.join(300)
    done.set()
    for t in threads:
        t.join(60)
    assert not errors, errors[:5]
    assert all(s > 0 for s in searches)
    expected = set(range(batches * 10, n0 + batch * batches))
    ids = store.ids()
    assert len(ids) == len(set(ids)) == len(store) == len(expected) and set(ids) == expected
    top = [row[0].id for row in store.search(new[::37], k=1)]
    assert top == list(range(n0, n0 + batch * batches, 37))
    assert not {h.id for row in store.search(base[:200], k=5) for h in row} & set(removed[:batches * 10])


@pytest.mark.slow
def test_an_insert_cut_by_the_server_stopping_keeps_whole_batches_and_says_which_may_be_in(tmp_path):
    data, port = tmp_path / "srv", free_port()
    proc = start_server(data, port)
    uri = f"http://127.0.0.1:{port}"
    try:
        store = MilvusStore(uri, DIM, model=MODEL, batch_size=200, timeout=5)
        x = unit(20_000, seed=9)
        watcher = MilvusStore(uri, DIM, model=MODEL, timeout=5)

        def stop_once_inserting():  # stop the server once some batches are in, not before
            while len(watcher) < 400:
                time.sleep(0.05)
            stop_server(proc)

        stopper = threading.Thread(target=stop_once_inserting)
        stopper.start()
        with pytest.raises(StoreError, match=r"insert stopped after (\d+) of 20000 rows") as caught:
            store.add(x)
        stopper.join()
        done = int(caught.value.args[0].split("after ")[1].split(" ")[0])
        assert done % 200 == 0 and done < 20_000
        proc = start_server(data, port)
        again = MilvusStore(uri, DIM, model=MODEL, timeout=20)
        # the confirmed batches, plus the one in flight when the server committed it but its answer was lost
        # (seen under load): whole batches, never part of one
        assert len(again) == again.info()["entries"] in (done, done + 200)
        assert f"rows {done}-{done + 199} of this call, may be stored too" in str(caught.value)
        assert again.ids() == list(range(len(again)))
    finally:
        stop_server(proc)


# ------------------------------------------------------------------------------- Retriever and CLI
def test_retriever_and_cli_on_a_store(tmp_path):
    from sdk import Retriever
    from sdk.cli import main
    from sdk_helpers import make_bundle, write_images

    bundle = make_bundle(tmp_path / "bundle", openvino=False)
    imgs = tmp_path / "photos"
    write_images(imgs / "roses", 5, start=0)
    write_images(imgs / "tulips", 5, start=5)
    uri = f"milvus://{tmp_path}/cat.db"
    runner = CliRunner()
    res = runner.invoke(main, ["index", str(bundle), str(imgs), "--store", uri])
    assert res.exit_code == 0 and "indexed 10 images (0 skipped)" in res.output, res.output
    res = runner.invoke(main, ["info", uri])
    assert res.exit_code == 0 and "10 entries, dim 16" in res.output, res.output
    q = str(imgs / "tulips" / "img_006.png")
    res = runner.invoke(main, ["query", uri, q, "-k", "3", "--json"])
    assert res.exit_code == 0, res.output
    top = json.loads(res.output)[0]["hits"][0]
    assert top["id"] == "tulips/img_006.png" and top["metadata"]["label"] == "tulips"
    res = runner.invoke(main, ["query", uri, q, "-k", "3", "--json", "--filter", 'label == "roses"'])
    assert {h["metadata"]["label"] for h in json.loads(res.output)[0]["hits"]} == {"roses"}
    res = runner.invoke(main, ["copy", uri, str(tmp_path / "local")])
    assert res.exit_code == 0 and "copied 10 entries" in res.output, res.output
    with Retriever.load(tmp_path / "local") as local, Retriever.load(uri) as remote:
        assert local.search(q, k=10) == remote.search(q, k=10) or \
            [h.id for h in local.search(q, k=10)[0]] == [h.id for h in remote.search(q, k=10)[0]]
    other = make_bundle(tmp_path / "other", seed=3, openvino=False)
    res = runner.invoke(main, ["index", str(other), str(imgs), "--store", uri])
    assert res.exit_code != 0 and "not comparable" in res.output and "Traceback" not in res.output
    res = runner.invoke(main, ["info", f"http://127.0.0.1:{free_port()}"])
    assert res.exit_code != 0 and "cannot reach the Milvus store" in res.output and len(res.output.splitlines()) == 1


# ------------------------------------------------------------------------ real embeddings (Flowers)
def test_flowers_embeddings_flat_store_matches_the_exact_catalogue(tmp_path, shared_data):
    from sdk import Retriever
    from sdk_helpers import make_bundle

    files = []
    for label in ("052", "060", "075", "090"):
        files += sorted((shared_data / "flowers102" / "images" / label).glob("*.jpg"))[:40]
    if len(files) < 100:
        pytest.skip("flowers102 images missing")
    bundle = make_bundle(tmp_path / "bundle", openvino=False)
    with Retriever.from_bundle(bundle, index="flat") as r:
        vecs = r.embed(files, batch_size=40)
    ids = [f.relative_to(shared_data).as_posix() for f in files]
    meta = [{"label": f.parent.name} for f in files]
    local = Catalog(vecs.shape[1], "flat")
    local.add(vecs, ids=ids, metadata=meta)
    store = MilvusStore(f"milvus://{tmp_path}/flowers.db", vecs.shape[1], index="flat")
    store.add(vecs, ids=ids, metadata=meta)
    l_scores, l_ids = local.search_raw(vecs, k=10)
    s_scores, s_ids = store.search_raw(vecs, k=10)
    np.testing.assert_allclose(s_scores, l_scores, atol=1e-5)
    differ = s_ids != l_ids
    # a differing id is an exact tie: its score equals the score the catalogue has at that rank
    assert np.allclose(s_scores[differ], l_scores[differ], atol=1e-5) and differ.mean() < 0.02


def test_without_pymilvus_the_store_names_the_extra_to_install(tmp_path):
    code = ("import sys; sys.modules['pymilvus'] = None\n"
            "from sdk.catalog.milvus import MilvusStore\n"
            f"MilvusStore('milvus://{tmp_path}/x.db', 4)\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode != 0 and "StoreError: the Milvus store needs pymilvus: pip install 'ibc[milvus]'" in r.stderr
