#!/usr/bin/env python
"""Search benchmark for the SDK catalogue: QPS and recall@10 of exact, HNSW and IVF-PQ search.

(a) Synthetic vectors with the structure of real embeddings: a Gaussian mixture of ~20,000
    clusters in a low-dimensional subspace, plus isotropic noise, unit-normalised; queries are
    fresh draws from the same mixture (held out). Uniform random vectors are no test of
    approximate search (every point is nearly equidistant), these are.
(b) Real embeddings: the ``../shared/data`` images embedded with ``--bundle`` (skipped without
    one), 1,000 of them held out as queries; plus ``embed()`` images/s for every backend the
    bundle has.

Everything goes through :class:`sdk.catalog.Catalog` (ids, locking and all), beside a plain
numpy baseline (matmul + argpartition in chunks). Recall@10 is against exact search. One run:

    python bench/bench_search.py                       # (a) at 1M x 512, ~25 min on 2 cores
    python bench/bench_search.py --bundle BUNDLE       # + (b)
    python bench/bench_search.py --n 100000 --clusters 2000   # quick look
    python bench/bench_search.py --only-remove         # first search after a remove, flat 1M (issue 14)

Prints a markdown report and writes the numbers as JSON (``--json-out``).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sdk.catalog import Catalog  # noqa: E402

log = logging.getLogger("bench_search")


# ----------------------------------------------------------------------------------------- utils
def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def gib(b: float) -> str:
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.0f} MiB"


def progress(it, total=None, desc=""):
    try:
        from tqdm import tqdm

        return tqdm(it, total=total, desc=desc, mininterval=5, file=sys.stderr)
    except ImportError:  # pragma: no cover
        return it


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of the true top-k found in the returned top-k."""
    k = truth.shape[1]
    return float(np.mean([len(set(f[:k].tolist()) & set(t.tolist())) / k for f, t in zip(found, truth)]))


# ------------------------------------------------------------------------------------------ data
class Mixture:
    """Gaussian mixture in a random ``subspace``-dim subspace of R^dim, plus noise; unit-normalised.

    Defaults give what trained embeddings look like: cosine ~0.6 to members of one's own
    cluster, ~0 +- 0.1 to others; neighbours within a cluster are ordered by the in-subspace
    spread and the noise.
    """

    def __init__(self, dim=512, clusters=20_000, subspace=64, spread=0.5, noise=0.25, seed=0):
        rng = np.random.default_rng(seed)
        self.dim, self.subspace, self.spread, self.noise = dim, subspace, spread, noise
        q, _ = np.linalg.qr(rng.standard_normal((dim, subspace)))
        self.basis = q.T.astype(np.float32)  # (subspace, dim), orthonormal rows
        self.centres = rng.standard_normal((clusters, subspace)).astype(np.float32)

    def sample(self, n: int, seed: int, chunk: int = 100_000) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(seed)
        out = np.empty((n, self.dim), np.float32)
        labels = rng.integers(0, len(self.centres), n)
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            z = self.centres[labels[s:e]] + self.spread * rng.standard_normal((e - s, self.subspace), np.float32)
            x = z @ self.basis
            x += self.noise * rng.standard_normal((e - s, self.dim), np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            out[s:e] = x
        return out, labels


# ------------------------------------------------------------------------------------- searchers
def numpy_search(db: np.ndarray, q: np.ndarray, k: int, chunk: int = 64) -> np.ndarray:
    """The baseline: scores = q @ db.T per chunk of queries, argpartition, sort the top k."""
    out = np.empty((len(q), k), np.int64)
    for s in range(0, len(q), chunk):
        scores = q[s:s + chunk] @ db.T
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, part, 1), axis=1)
        out[s:s + chunk] = np.take_along_axis(part, order, 1)
    return out


def timed(fn, repeat: int = 3, budget_s: float = 3.0):
    """(result, best wall seconds) over up to ``repeat`` runs, stopping once ``budget_s`` is spent."""
    best, result, spent = float("inf"), None, 0.0
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        dt = time.perf_counter() - t0
        best, spent = min(best, dt), spent + dt
        if spent >= budget_s:
            break
    return result, best


def build_catalog(kind: str, db: np.ndarray, chunk: int = 100_000, **opts) -> tuple[Catalog, float, int]:
    """Build through the SDK; returns (catalog, seconds, resident bytes it added)."""
    gc.collect()
    before = rss_bytes()
    t0 = time.perf_counter()
    cat = Catalog(db.shape[1], kind, **opts)
    if kind == "ivfpq":  # trains on its first add: give it everything at once
        cat.add(db)
    else:
        for s in progress(range(0, len(db), chunk), total=-(-len(db) // chunk), desc=f"build {kind}"):
            cat.add(db[s:s + chunk])
    secs = time.perf_counter() - t0
    gc.collect()
    return cat, secs, rss_bytes() - before


def sweep(cat: Catalog, q: np.ndarray, truth: np.ndarray, k: int, param: str | None, values, repeat: int) -> list:
    rows = []
    for v in values:
        kw = {param: v} if param else {}
        cat.search_raw(q[:50], k, **kw)  # warm-up
        (_, ids), secs = timed(lambda: cat.search_raw(q, k, **kw), repeat)
        rows.append({"param": param, "value": v, "qps": len(q) / secs, "recall": recall_at_k(ids, truth),
                     "seconds": secs})
        log.info("%s %s=%s: %.0f QPS, recall@%d %.4f", cat.kind, param, v, len(q) / secs, k, rows[-1]["recall"])
    return rows


def remove_then_search(cat: Catalog, q: np.ndarray, k: int, rounds: int = 5, per_round: int = 100,
                       seed: int = 0) -> dict:
    """The first search after each ``remove`` against a steady search of the same queries (issue 14, item 9).

    Steady: the median of 5 single runs just before the remove (a shared machine is noisy).

    A flat catalogue masks removed entries as tombstones in its int8 scan; rebuilding the scan
    instead would make that first search cost seconds on a million vectors.
    """
    rng = np.random.default_rng(seed)
    ids = cat.ids()
    rows = []
    for r in range(rounds):
        cat.search_raw(q, k)
        steady = float(np.median([timed(lambda: cat.search_raw(q, k), 1)[1] for _ in range(5)]))
        cat.remove([ids[i] for i in rng.choice(len(ids), per_round, replace=False) if ids[i] in cat])
        t0 = time.perf_counter()
        cat.search_raw(q, k)
        first = time.perf_counter() - t0
        rows.append({"steady_s": steady, "first_after_remove_s": first, "ratio": first / steady})
        log.info("remove round %d: steady %.3fs, first search after remove %.3fs (%.2fx)", r, steady, first,
                 first / steady)
    return {"rounds": rows, "max_ratio": max(r["ratio"] for r in rows), "removed_per_round": per_round,
            "queries": len(q), "tombstones": cat.info()["tombstones"], "exact_scan": cat.info()["exact_scan"]}


def run_remove_only(name: str, db: np.ndarray, q: np.ndarray, k: int, args) -> dict:
    """Only the flat catalogue's remove-then-search measurement (``--only-remove``)."""
    cat, secs, _ = build_catalog("flat", db)
    cat.search_raw(q[:1], k)  # builds the int8 exact scan
    res = {"name": name, "n": len(db), "dim": db.shape[1], "k": k, "build_s": secs,
           "remove": remove_then_search(cat, q[:args.remove_queries], k)}
    return res


def run_vectors(name: str, db: np.ndarray, q: np.ndarray, k: int, args) -> dict:
    """numpy, flat, HNSW and IVF-PQ over one vector set."""
    res = {"name": name, "n": len(db), "dim": db.shape[1], "queries": len(q), "k": k, "indexes": {}}
    log.info("[%s] numpy baseline over %d x %d", name, *db.shape)
    numpy_search(db, q[:64], k)
    np_ids, np_secs = timed(lambda: numpy_search(db, q, k), args.repeat)
    res["numpy"] = {"qps": len(q) / np_secs, "seconds": np_secs}

    log.info("[%s] exact (flat)", name)
    before = rss_bytes()
    cat, secs, _ = build_catalog("flat", db)
    t0 = time.perf_counter()
    cat.search_raw(q[:1], k)  # builds the int8 exact scan (if the catalogue is large enough)
    scan_s = time.perf_counter() - t0
    mem = rss_bytes() - before
    cat.search_raw(q[:64], k)
    (_, truth), ex_secs = timed(lambda: cat.search_raw(q, k), args.repeat)
    truth = truth.astype(np.int64)
    scan = cat.info()["exact_scan"]
    res["indexes"]["flat"] = {"build_s": secs + scan_s, "scan_build_s": scan_s, "mem_bytes": mem,
                              "qps": len(q) / ex_secs, "recall": recall_at_k(np_ids, truth),
                              "int8_scan": scan, "numpy_agreement": recall_at_k(np_ids, truth)}
    res["indexes"]["flat"]["remove"] = remove_then_search(cat, q[:args.remove_queries], k)
    cat.spec.exact_int8 = False  # the plain faiss fp32 scan, for comparison
    cat.search_raw(q[:64], k)
    (_, plain), pl_secs = timed(lambda: cat.search_raw(q, k), args.repeat)
    res["indexes"]["flat_fp32"] = {"qps": len(q) / pl_secs, "recall": recall_at_k(plain, truth)}
    log.info("exact: %.0f QPS (int8 certified scan %s), faiss fp32 scan %.0f QPS, numpy %.0f QPS",
             len(q) / ex_secs, scan, len(q) / pl_secs, res["numpy"]["qps"])
    del cat
    gc.collect()

    if not args.skip_hnsw:
        log.info("[%s] HNSW M=%d efConstruction=%d", name, args.hnsw_m, args.ef_construction)
        cat, secs, mem = build_catalog("hnsw", db, hnsw_m=args.hnsw_m, ef_construction=args.ef_construction)
        rows = sweep(cat, q, truth, k, "ef_search", args.ef_search, args.repeat)
        res["indexes"]["hnsw"] = {"build_s": secs, "mem_bytes": mem, "sweep": rows,
                                  "params": f"M={args.hnsw_m}, efConstruction={args.ef_construction}"}
        del cat
        gc.collect()

    for dims in args.hnsw_dims:
        if dims >= db.shape[1]:
            continue
        log.info("[%s] HNSW over a %d-d projection, M=%d, exact re-rank of %dk", name, dims, args.hnsw_m,
                 args.refine_factor)
        cat, secs, mem = build_catalog("hnsw", db, hnsw_m=args.hnsw_m, ef_construction=args.ef_construction,
                                       hnsw_dims=dims, refine_factor=args.refine_factor)
        rows = sweep(cat, q, truth, k, "ef_search", args.ef_search, args.repeat)
        res["indexes"][f"hnsw_proj{dims}"] = {
            "build_s": secs, "mem_bytes": mem, "sweep": rows,
            "params": f"{dims}-d projection, M={args.hnsw_m}, efConstruction={args.ef_construction}, "
                      f"re-rank {args.refine_factor}k"}
        del cat
        gc.collect()

    if not args.skip_ivfpq:
        nlist = args.nlist or None
        log.info("[%s] IVF-PQ nlist=%s pq_m=%s", name, nlist or "auto", args.pq_m or "auto")
        cat, secs, mem = build_catalog("ivfpq", db, nlist=nlist, pq_m=args.pq_m or None,
                                       train_size=args.ivf_train or None)
        rows = sweep(cat, q, truth, k, "nprobe", args.nprobe, args.repeat)
        ivf = cat.index.faiss_index
        res["indexes"]["ivfpq"] = {"build_s": secs, "mem_bytes": mem, "sweep": rows,
                                   "params": f"nlist={ivf.nlist}, PQ{ivf.pq.M}x{ivf.pq.nbits}"}
        del cat, ivf
        gc.collect()
    return res


# ------------------------------------------------------------------------------------- real data
def list_images(data_dir: Path) -> list[Path]:
    exts = {".jpg", ".jpeg", ".png"}
    return sorted(p for p in data_dir.rglob("*") if p.suffix.lower() in exts)


def run_real(args) -> dict | None:
    if not args.bundle:
        log.info("(b) skipped: no --bundle given")
        return None
    if not Path(args.bundle).is_dir():
        log.warning("(b) skipped: bundle %s not found", args.bundle)
        return None
    from sdk.backends import runtime_status
    from sdk.bundle import load_manifest
    from sdk.retriever import Retriever

    manifest = load_manifest(args.bundle)
    images = list_images(Path(args.data) / "flowers102" / "images") if not args.images else list_images(Path(args.images))
    if args.max_images:
        images = images[: args.max_images]
    out = {"bundle": str(args.bundle), "images": len(images), "embed": []}
    # embed() throughput per backend (and precision) the bundle has and this machine runs
    sample = images[: args.embed_sample]
    for v in manifest.variants:
        ok, why = runtime_status(v.backend)
        if not ok:
            out["embed"].append({"variant": v.name, "skipped": why})
            continue
        r = Retriever.from_bundle(args.bundle, backend=v.backend, precision=v.precision)
        r.embed(sample[:8])
        _, secs = timed(lambda: r.embed(sample, batch_size=32))
        out["embed"].append({"variant": v.name, "images_per_s": len(sample) / secs, "passed": v.passed})
        log.info("embed %s: %.1f images/s", v.name, len(sample) / secs)
        r.close()
    cache = Path(args.cache) if args.cache else None
    if cache and cache.is_file():
        vecs = np.load(cache)
    else:
        r = Retriever.from_bundle(args.bundle)
        t0 = time.perf_counter()
        vecs = np.concatenate([r.embed(images[s:s + 512]) for s in progress(range(0, len(images), 512),
                                                                              total=-(-len(images) // 512),
                                                                              desc=f"embed ({r.variant.name})")])
        out["embed_all"] = {"variant": r.variant.name, "seconds": time.perf_counter() - t0}
        if cache:
            np.save(cache, vecs)
    rng = np.random.default_rng(0)
    nq = min(args.queries, len(vecs) // 5)
    qi = rng.choice(len(vecs), nq, replace=False)
    mask = np.ones(len(vecs), bool)
    mask[qi] = False
    out["search"] = run_vectors("real", np.ascontiguousarray(vecs[mask]), np.ascontiguousarray(vecs[qi]), args.k,
                                argparse.Namespace(**{**vars(args), "nlist": args.real_nlist, "pq_m": 0}))
    return out


# ---------------------------------------------------------------------------------------- report
def markdown(res: dict) -> str:
    lines = []
    for part in [res.get("synthetic"), (res.get("real") or {}).get("search")]:
        if not part:
            continue
        flat_qps = part["indexes"]["flat"]["qps"]
        lines.append(f"\n**{part['name']}**: {part['n']:,} x {part['dim']}, {part['queries']:,} queries, k = {part['k']}\n")
        lines.append("| method | setting | build | memory | QPS | recall@10 | vs exact QPS |")
        lines.append("|---|---|---:|---:|---:|---:|---:|")
        lines.append(f"| numpy matmul + argpartition | chunks of 64 | - | (the data) | {part['numpy']['qps']:.0f} | 1.000 | "
                     f"{part['numpy']['qps'] / flat_qps:.2f}x |")
        f = part["indexes"]["flat"]
        how = "certified int8 scan + fp32 re-rank" if f.get("int8_scan") else "faiss fp32 scan"
        lines.append(f"| exact, SDK flat ({how}) | - | {f['build_s']:.1f} s | {gib(f['mem_bytes'])} | {f['qps']:.0f} | "
                     f"{f['recall']:.3f} | 1x ({f['qps'] / part['numpy']['qps']:.1f}x numpy) |")
        if "flat_fp32" in part["indexes"] and f.get("int8_scan"):
            p32 = part["indexes"]["flat_fp32"]
            lines.append(f"| exact, faiss IndexFlatIP (fp32 BLAS) | - | | | {p32['qps']:.0f} | {p32['recall']:.3f} | "
                         f"{p32['qps'] / flat_qps:.2f}x ({p32['qps'] / part['numpy']['qps']:.1f}x numpy) |")
        approx = [(kind, "HNSW" if kind.startswith("hnsw") else "IVF-PQ")
                  for kind in part["indexes"] if kind not in ("flat", "flat_fp32")]
        for kind, label in approx:
            ix = part["indexes"][kind]
            for i, row in enumerate(ix["sweep"]):
                build = f"{ix['build_s']:.0f} s" if i == 0 else ""
                mem = gib(ix["mem_bytes"]) if i == 0 else ""
                name = f"{label} ({ix['params']})" if i == 0 else ""
                lines.append(f"| {name} | {row['param']}={row['value']} | {build} | {mem} | {row['qps']:.0f} | "
                             f"{row['recall']:.3f} | {row['qps'] / flat_qps:.1f}x |")
        best = [(row["qps"], kind, row) for kind, _ in approx
                for row in part["indexes"][kind]["sweep"] if row["recall"] >= 0.95]
        if best:
            qps, kind, row = max(best, key=lambda t: t[0])
            lines.append(f"\nBest approximate at recall@10 >= 0.95: {kind} {row['param']}={row['value']}, "
                         f"{qps:.0f} QPS = {qps / flat_qps:.1f}x exact (recall {row['recall']:.3f}).")
        lines.append(f"Exact vs numpy: {flat_qps / part['numpy']['qps']:.1f}x; numpy and exact agree on "
                     f"{part['indexes']['flat']['numpy_agreement']:.4f} of the top-10.")
        rm = part["indexes"]["flat"].get("remove")
        if rm:
            lines.append(f"First search after a remove of {rm['removed_per_round']} (flat, {rm['queries']} queries): "
                         f"at most {rm['max_ratio']:.2f}x a steady search over {len(rm['rounds'])} rounds.")
    real = res.get("real")
    if real and real.get("embed"):
        lines.append("\n| embed() variant | images/s |")
        lines.append("|---|---:|")
        for e in real["embed"]:
            lines.append(f"| {e['variant']} | " + (f"{e['images_per_s']:.1f} |" if "images_per_s" in e
                                                     else f"skipped: {e['skipped']} |"))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--clusters", type=int, default=20_000)
    p.add_argument("--subspace", type=int, default=64)
    p.add_argument("--spread", type=float, default=0.5)
    p.add_argument("--noise", type=float, default=0.25)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("-k", "--k", type=int, default=10)
    p.add_argument("--repeat", type=int, default=3, help="best of up to this many timed runs (3 s budget)")
    p.add_argument("--hnsw-m", type=int, default=32)
    p.add_argument("--ef-construction", type=int, default=40)
    p.add_argument("--ef-search", type=int, nargs="+", default=[16, 24, 32, 48, 64, 128, 256])
    p.add_argument("--hnsw-dims", type=int, nargs="*", default=[128],
                   help="also HNSW over these projections with exact re-rank (none: skip)")
    p.add_argument("--refine-factor", type=int, default=3, help="projected HNSW: re-rank refine_factor * k")
    p.add_argument("--nlist", type=int, default=0, help="IVF lists (0: the catalogue's auto, ~4 sqrt(n))")
    p.add_argument("--real-nlist", type=int, default=0)
    p.add_argument("--pq-m", type=int, default=0, help="PQ sub-quantizers (0: auto, dim/8)")
    p.add_argument("--ivf-train", type=int, default=100_000, help="IVF-PQ training sample (0: the catalogue's)")
    p.add_argument("--nprobe", type=int, nargs="+", default=[4, 16, 64, 256])
    p.add_argument("--skip-synthetic", action="store_true")
    p.add_argument("--skip-hnsw", action="store_true")
    p.add_argument("--skip-ivfpq", action="store_true")
    p.add_argument("--bundle", default=None, help="exported bundle for part (b); skipped when absent")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--images", default=None, help="image folder for (b) instead of flowers102")
    p.add_argument("--max-images", type=int, default=0)
    p.add_argument("--embed-sample", type=int, default=256)
    p.add_argument("--cache", default=None, help="cache (b)'s embeddings in this .npy")
    p.add_argument("--remove-queries", type=int, default=100,
                   help="queries per timed search in the remove-then-search measurement")
    p.add_argument("--only-remove", action="store_true",
                   help="(a) only: build the flat catalogue and time the first search after each remove")
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    import faiss

    t_start = time.perf_counter()
    res = {"machine": {"cpu_count": os.cpu_count(), "faiss_threads": faiss.omp_get_max_threads(),
                       "faiss": faiss.__version__, "numpy": np.__version__, "platform": platform.platform()},
           "args": vars(args)}
    if not args.skip_synthetic:
        t0 = time.perf_counter()
        mix = Mixture(args.dim, args.clusters, args.subspace, args.spread, args.noise, seed=0)
        db, _ = mix.sample(args.n, seed=1)
        q, _ = mix.sample(args.queries, seed=2)
        log.info("generated %d x %d mixture vectors in %.1fs", args.n, args.dim, time.perf_counter() - t0)
        name = f"(a) Gaussian mixture, {args.clusters:,} clusters in {args.subspace}-d + noise"
        if args.only_remove:
            res["remove_only"] = run_remove_only(name, db, q, args.k, args)
            print(json.dumps(res["remove_only"], indent=2, default=float))
            if args.json_out:
                with open(args.json_out, "w") as f:
                    json.dump(res, f, indent=2, default=float)
            return 0
        res["synthetic"] = run_vectors(name, db, q, args.k, args)
        del db
        gc.collect()
    res["real"] = run_real(args)
    res["total_s"] = time.perf_counter() - t_start
    report = markdown(res) + f"\n\nWhole run: {res['total_s'] / 60:.1f} min.\n"
    print(report)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(res, f, indent=2, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())
