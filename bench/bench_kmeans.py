"""sdk.kmeans against faiss.Kmeans: time, rows searched, and whether the assignments agree.

NMI's k-means is most of evaluate()'s time at SOP size; sdk.kmeans claims faiss.Kmeans's
result for less search. This checks both claims: on the SOP-sized benchmark data
(bench_metrics.make_data), and on random configurations (``--random N``: clustered
512-d data, half of it with 11% exact duplicates, random k, niter and seed) where it
counts how many runs ended with any point assigned differently.

    python bench/bench_kmeans.py                 # SOP size, writes bench/out/bench_kmeans.json
    python bench/bench_kmeans.py --random 200    # plus 200 random configurations
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import faiss
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_metrics import OUT_DIR, machine, make_data  # noqa: E402
from sdk.kmeans import kmeans  # noqa: E402
from sdk.metrics import l2_normalize  # noqa: E402


def faiss_assignments(x: np.ndarray, k: int, niter: int, seed: int) -> np.ndarray:
    """What PML's FaissKMeans does (here without faiss's sub-sampling, as sdk.metrics asks)."""
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, min_points_per_centroid=1,
                      max_points_per_centroid=x.shape[0], verbose=False)
    km.train(x)
    return km.index.search(x, 1)[1][:, 0]


def compare(x: np.ndarray, k: int, niter: int, seed: int) -> dict:
    t0 = time.perf_counter()
    ref = faiss_assignments(x, k, niter, seed)
    t1 = time.perf_counter()
    ours = kmeans(x, k, niter=niter, seed=seed)
    t2 = time.perf_counter()
    return {
        "n": int(x.shape[0]), "k": int(k), "d": int(x.shape[1]), "niter": niter, "seed": seed,
        "faiss_s": t1 - t0, "ours_s": t2 - t1,
        "points_differing": int(np.count_nonzero(ours.assignments != ref)),
        "updates": ours.updates, "splits": ours.splits, "searched_rows": list(ours.searched_rows),
    }


def random_configs(count: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for trial in range(count):
        n = int(rng.integers(200, 3000))
        k = int(rng.integers(2, n // 3))
        centres = rng.normal(size=(k, 512))
        x = centres[rng.integers(0, k, n)] + 0.8 * rng.normal(size=(n, 512))
        if trial % 2:
            x[1::9] = x[:-1:9][: len(x[1::9])]  # exact duplicates, as in SOP
        x = l2_normalize(x)
        out.append(compare(x, k, int(rng.integers(0, 30)), int(rng.integers(0, 1000))))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=60_000)
    ap.add_argument("--classes", type=int, default=11_316)
    ap.add_argument("--niter", type=int, default=20)
    ap.add_argument("--random", type=int, default=0, help="random configurations to compare as well")
    ap.add_argument("--out", type=Path, default=OUT_DIR / "bench_kmeans.json")
    args = ap.parse_args(argv)

    host = machine()
    x, _ = make_data(args.n, args.classes, 512, 0)
    main_run = compare(l2_normalize(x), args.classes, args.niter, 0)
    print(f"{args.n} x 512, k={args.classes}, niter={args.niter}: faiss.Kmeans {main_run['faiss_s']:.1f} s, "
          f"sdk.kmeans {main_run['ours_s']:.1f} s ({main_run['faiss_s'] / main_run['ours_s']:.2f}x); "
          f"points assigned differently: {main_run['points_differing']}; "
          f"rows searched per pass: {main_run['searched_rows']}")
    record = {"machine": host, "faiss": faiss.__version__, "sop_sized": main_run}
    if args.random:
        runs = random_configs(args.random, seed=1)
        differing = [r for r in runs if r["points_differing"]]
        total_f, total_o = sum(r["faiss_s"] for r in runs), sum(r["ours_s"] for r in runs)
        print(f"{len(runs)} random configurations: {len(differing)} ended with points assigned "
              f"differently (most: {max((r['points_differing'] for r in differing), default=0)} of "
              f"{max((r['n'] for r in differing), default=0)}); time faiss {total_f:.1f} s, ours {total_o:.1f} s")
        record["random"] = {"count": len(runs), "runs_differing": len(differing), "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
