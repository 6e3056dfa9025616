#!/usr/bin/env python
"""Store benchmark: the local catalogue (flat, HNSW) against the Milvus store (Milvus Lite embedded
file and a Milvus Lite gRPC server on 127.0.0.1; FLAT and HNSW index params).

Data: ``--n`` x 512 vectors from ``bench_search.py``'s Gaussian mixture, ``--queries`` held-out
draws of the same mixture, k = 10. Per configuration: insert throughput (vectors/s, through
``add`` in batches), search QPS (one call per query batch of ``--query-batch``, the best of 2
passes), recall@10 against exact numpy search, and peak resident memory (the benchmark process
with ``ru_maxrss``; for server mode also the server process's ``VmHWM``). Each configuration runs
in its own process so that peaks do not add up.

    python bench/bench_store.py                 # 200k x 512, 1,000 queries
    python bench/bench_store.py --n 20000       # quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_search import Mixture, numpy_search, recall_at_k  # noqa: E402

CONFIGS = ["local-flat", "local-hnsw", "milvus-lite-FLAT", "milvus-lite-HNSW", "milvus-server-FLAT",
           "milvus-server-HNSW"]


def data(args) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(db, queries, exact top-k ids), cached in --cache as .npy files."""
    cache = Path(args.cache)
    files = [cache / f"{name}_{args.n}.npy" for name in ("db", "q", "truth")]
    if not all(f.exists() for f in files):
        cache.mkdir(parents=True, exist_ok=True)
        mix = Mixture(512, args.clusters, seed=0)
        db, _ = mix.sample(args.n, seed=1)
        q, _ = mix.sample(args.queries, seed=2)
        truth = numpy_search(db, q, args.k)
        for f, a in zip(files, (db, q, truth)):
            np.save(f, a)
    return tuple(np.load(f) for f in files)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vm_hwm(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def start_server(data_dir: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    exe = Path(sys.executable).with_name("milvus-lite")
    proc = subprocess.Popen([str(exe), "server", "--data-dir", data_dir, "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, f"http://127.0.0.1:{port}"
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("milvus-lite server did not start")


def run_one(config: str, args) -> dict:
    """One configuration, in this process: build, insert, search; returns its numbers."""
    from sdk.catalog import Catalog
    from sdk.catalog.milvus import MilvusStore

    db, q, truth = data(args)
    server = None
    tmp = tempfile.mkdtemp(prefix="bench_store_")
    if config.startswith("local"):
        kind = config.split("-")[1]
        store = Catalog(512, kind, hnsw_m=args.hnsw_m, ef_construction=args.ef_construction)
    else:
        index = "flat" if config.endswith("FLAT") else "hnsw"
        if "server" in config:
            server, uri = start_server(os.path.join(tmp, "server"))
        else:
            uri = f"milvus://{tmp}/catalog.db"
        store = MilvusStore(uri, 512, index=index, hnsw_m=args.hnsw_m, ef_construction=args.ef_construction,
                            batch_size=args.batch, timeout=600)
    t0 = time.perf_counter()
    for s in range(0, len(db), args.batch):
        store.add(db[s:s + args.batch])
    insert_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    store.search_raw(q[:10], args.k, ef_search=args.ef_search)  # warm-up (an index may build lazily)
    warm_s = time.perf_counter() - t0
    best, ids = float("inf"), None
    for _ in range(2):
        t0 = time.perf_counter()
        got = [store.search_raw(q[s:s + args.query_batch], args.k, ef_search=args.ef_search)[1]
               for s in range(0, len(q), args.query_batch)]
        best = min(best, time.perf_counter() - t0)
        ids = np.concatenate(got).astype(np.int64)
    res = {"config": config, "n": len(db), "insert_s": insert_s, "insert_per_s": len(db) / insert_s,
           "first_search_s": warm_s, "qps": len(q) / best, "recall": recall_at_k(ids, truth), "entries": len(store),
           "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if server is not None:
        res["server_peak_rss"] = vm_hwm(server.pid)
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    return res


def gib(b: float) -> str:
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.0f} MiB"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200_000)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--clusters", type=int, default=5000)
    p.add_argument("-k", "--k", type=int, default=10)
    p.add_argument("--batch", type=int, default=5000, help="vectors per add() call (and per Milvus insert)")
    p.add_argument("--query-batch", type=int, default=100)
    p.add_argument("--hnsw-m", type=int, default=16)
    p.add_argument("--ef-construction", type=int, default=100)
    p.add_argument("--ef-search", type=int, default=64)
    p.add_argument("--configs", nargs="+", default=CONFIGS, choices=CONFIGS)
    p.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "ibc_bench_store"))
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one configuration
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.one, args)))
        return 0
    data(args)  # once, before the children read it
    rows = []
    for config in args.configs:
        cmd = [sys.executable, __file__, "--one", config] + [a for a in (argv or sys.argv[1:])
                                                              if a not in args.configs and a != "--configs"]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            rows.append({"config": config, "error": (out.stderr.strip().splitlines() or ["?"])[-1]})
        else:
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"\n{args.n:,} x 512 mixture vectors, {args.queries:,} queries, k = {args.k}; HNSW M={args.hnsw_m}, "
          f"efConstruction={args.ef_construction}, ef_search={args.ef_search}; inserts in batches of {args.batch:,}, "
          f"searches in batches of {args.query_batch}. CPU: {cpu} ({os.cpu_count()} cores), load average at the "
          f"end {os.getloadavg()[0]:.1f}; {platform.python_version()}.\n")
    print("| store | insert vectors/s | first search | QPS | recall@10 | peak memory |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['config']} | failed: {r['error']} | | | | |")
            continue
        mem = gib(r["peak_rss"]) + (f" (+ server {gib(r['server_peak_rss'])})" if "server_peak_rss" in r else "")
        print(f"| {r['config']} | {r['insert_per_s']:,.0f} | {r['first_search_s']:.2f} s | {r['qps']:,.0f} | "
              f"{r['recall']:.3f} | {mem} |")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
