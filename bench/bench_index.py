"""Indexing speed: is decoding starving the model? ``python bench/bench_index.py BUNDLE IMAGES_DIR``.

For the bundle's auto-chosen variant (or ``--precision``), on the images under IMAGES_DIR
(``<class>/<image>``): the model alone on preprocessed batches, decoding alone, and the Retriever
end to end, for each decode mode of :mod:`sdk.decode` (exact, fast = crop-first resize, draft =
also JPEG draft) and decode-worker count; plus, per mode, how far its embeddings are from the
exact ones (cosine) and the leave-one-out Recall@1 of the set. Prints a table, writes JSON to
bench/out/index_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdk.cli import find_images  # noqa: E402
from sdk.metrics import evaluate  # noqa: E402
from sdk.retriever import Retriever  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("images")
    ap.add_argument("--limit", type=int, default=None, help="use the first N images")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--workers", default="1,2", help="decode worker counts to try")
    ap.add_argument("--modes", default="exact,fast,draft")
    ap.add_argument("--threads", type=int, default=None, help="runtime threads (default: the runtime's)")
    ap.add_argument("--repeats", type=int, default=2, help="end-to-end passes per setting (best is kept)")
    args = ap.parse_args()

    files = find_images(args.images)[: args.limit]
    paths = [str(f) for f in files]
    labels = np.asarray([hash(Path(p).parent.name) % (1 << 31) for p in paths])
    rows, ref = [], None
    with Retriever.from_bundle(args.bundle, precision=args.precision, threads=args.threads) as r:
        variant = r.variant.name
        from pipeline.throughput import model_rate

        m_rate = max(model_rate(r, paths[:512]) for _ in range(2))
        print(f"{variant}: model alone {m_rate:.1f} images/s on {min(512, len(paths))} preprocessed images "
              f"(batch 32)", flush=True)
        for mode in args.modes.split(","):
            for w in (int(x) for x in args.workers.split(",")):
                r.decode, r.decode_workers = mode, w
                if r._pool is not None:
                    r._pool.shutdown()
                    r._pool = None
                t0 = time.perf_counter()
                n = sum(len(c) for c in r._chunks(paths, 32))
                dec = n / (time.perf_counter() - t0)
                best, emb = 0.0, None
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    emb = r.embed(paths)
                    best = max(best, len(paths) / (time.perf_counter() - t0))
                if ref is None:
                    ref = emb
                cos = np.sum(emb * ref, axis=1)
                r1 = evaluate(emb, labels, ks=(1,), nmi=False)["recall@1"]
                row = {"mode": mode, "workers": w, "decode_alone": dec, "index": best, "index_vs_model": best / m_rate,
                       "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()), "recall@1": float(r1)}
                rows.append(row)
                print(f"  decode={mode:5s} workers={w}: decode alone {dec:6.1f}/s, index {best:6.1f}/s "
                      f"({100 * best / m_rate:4.0f}% of the model), cosine to exact mean {cos.mean():.6f} "
                      f"min {cos.min():.6f}, R@1 {100 * r1:.2f}", flush=True)
    load = os.getloadavg()
    out = {"bundle": args.bundle, "variant": variant, "images": len(paths), "model_alone": m_rate, "rows": rows,
           "load_average": load, "cpu_count": os.cpu_count()}
    os.makedirs(Path(__file__).parent / "out", exist_ok=True)
    with open(Path(__file__).parent / "out" / "index_speed.json", "w") as f:
        json.dump(out, f, indent=2)
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
