"""Benchmark sdk.metrics.evaluate against pytorch-metric-learning's AccuracyCalculator.

SOP-sized by default (60,000 × 512, 11,316 classes of 2-12 images): the size at which a
dense N × N similarity matrix (14.4 GB in float32) stops being an option. Each
measurement runs in its own subprocess so wall time and peak RSS belong to that run only
(``os.wait4`` returns the child's own rusage; RUSAGE_CHILDREN would be a max over all).

    python bench/bench_metrics.py                       # full size, writes bench/out/bench_metrics.json
    python bench/bench_metrics.py --n 6000 --classes 1130   # quick run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from sdk.cpu import cpu_description  # noqa: E402

OUT_DIR = ROOT / "bench" / "out"
PML_METRICS = ("precision_at_1", "r_precision", "mean_average_precision_at_r")
OURS_TO_PML = {"precision@1": "precision_at_1", "r_precision": "r_precision", "map@r": "mean_average_precision_at_r", "nmi": "NMI"}


# --------------------------------------------------------------------------- data


def class_sizes(n: int, n_classes: int, rng: np.random.Generator, lo: int = 2, hi: int = 12) -> np.ndarray:
    """SOP-like sizes: 2..12 per class, many small classes, few large, summing to n."""
    if not lo * n_classes <= n <= hi * n_classes:
        raise ValueError(f"{n} items cannot be split into {n_classes} classes of {lo}-{hi}")
    support = np.arange(lo, hi + 1)
    # decay chosen so the mean lands near SOP's 5.35 images per class
    p = np.exp(-(support - lo) / 4.0)
    sizes = rng.choice(support, size=n_classes, p=p / p.sum())
    while (diff := n - int(sizes.sum())) != 0:  # nudge random classes until the total is n
        step = 1 if diff > 0 else -1
        movable = np.flatnonzero((sizes < hi) if step > 0 else (sizes > lo))
        pick = rng.choice(movable, size=min(abs(diff), movable.size), replace=False)
        sizes[pick] += step
    return sizes


def make_data(n: int, n_classes: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Clustered embeddings with SOP-like difficulty (R@1 around 0.7-0.8).

    12 super-categories as in SOP, classes scattered around them, per-class spread varying
    (some products look alike, some do not), and 0.5% exact within-class duplicates (SOP
    has repeated photos), which exercise removal of the self-match by index.
    """
    rng = np.random.default_rng(seed)
    sizes = class_sizes(n, n_classes, rng)
    labels = np.repeat(np.arange(n_classes), sizes)
    supers = rng.normal(size=(12, dim)).astype(np.float32)
    centres = supers[rng.integers(0, 12, n_classes)] + rng.normal(size=(n_classes, dim)).astype(np.float32)
    spread = (2.4 * np.exp(0.12 * rng.normal(size=n_classes))).astype(np.float32)
    x = centres[labels]
    x += spread[labels, None] * rng.normal(size=x.shape).astype(np.float32)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    dup_classes = rng.choice(n_classes, size=max(1, n // 200), replace=False)
    x[starts[dup_classes] + 1] = x[starts[dup_classes]]  # every class has >= 2 members
    perm = rng.permutation(n)
    return np.ascontiguousarray(x[perm], dtype=np.float32), labels[perm].astype(np.int64)


# --------------------------------------------------------------------------- child runs


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def child(kind: str, data: Path, nmi: bool, ks: tuple[int, ...], pml_k: str, pml_index: str = "l2") -> dict:
    """One measured run; prints a JSON line. Imports happen inside so each side pays its own."""
    t_import = time.perf_counter()
    if kind == "ours":
        sys.path.insert(0, str(ROOT))
        from sdk.metrics import evaluate
    else:
        import torch
        from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    import_s = time.perf_counter() - t_import
    x, y = np.load(data / "x.npy"), np.load(data / "y.npy")
    baseline = _rss_mb()
    t0, c0 = time.perf_counter(), time.process_time()
    if kind == "ours":
        result = evaluate(x, y, ks=ks, nmi=nmi)
        torch_loaded = "torch" in sys.modules
    else:
        # PML's defaults (FaissKNN = IndexFlatL2, FaissKMeans(niter=20)) on L2-normalised
        # vectors, whose L2 ranking is the cosine ranking evaluate() uses.
        xn = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        include = PML_METRICS + (("NMI",) if nmi else ())
        k = None if pml_k == "none" else "max_bin_count"
        extra = {}
        if pml_index == "ip":  # the same faiss kernel as evaluate(): agreement should be exact
            import faiss
            from pytorch_metric_learning.utils.inference import FaissKNN

            extra["knn_func"] = FaissKNN(index_init_fn=faiss.IndexFlatIP)
        calc = AccuracyCalculator(include=include, k=k, device=torch.device("cpu"), **extra)
        result = calc.get_accuracy(xn, y)
        torch_loaded = True
    eval_s, eval_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    return {
        "import_s": import_s,
        "eval_s": eval_s,
        "eval_cpu_s": eval_cpu_s,  # all threads; less sensitive than wall time to other jobs
        "baseline_rss_mb": baseline,
        "peak_rss_mb_self": _rss_mb(),
        "torch_loaded": torch_loaded,
        "metrics": {k: (v if isinstance(v, int) else float(v)) for k, v in result.items()},
    }


def measure(kind: str, data: Path, nmi: bool, ks: tuple[int, ...], pml_k: str, pml_index: str = "l2") -> dict:
    """Run ``child`` in a fresh interpreter; wall time and peak RSS of that process only."""
    cmd = [sys.executable, __file__, "--child", kind, "--data", str(data), "--ks", ",".join(map(str, ks)),
           "--pml-k", pml_k, "--pml-index", pml_index] + ([] if nmi else ["--no-nmi"])
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out_f, tempfile.TemporaryFile("w+") as err_f:
        proc = subprocess.Popen(cmd, stdout=out_f, stderr=err_f, text=True)
        _, status, usage = os.wait4(proc.pid, 0)  # reap it ourselves to get its own rusage
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out_f.seek(0), err_f.seek(0)
        out, err = out_f.read(), err_f.read()
    record = {"kind": kind, "nmi": nmi, "wall_s": wall, "returncode": proc.returncode,
              "cpu_s": usage.ru_utime + usage.ru_stime,
              "peak_rss_mb": usage.ru_maxrss / 1024.0, "load_avg_1m_before_after": [load_before, os.getloadavg()[0]]}
    if proc.returncode != 0:
        record["error"] = err.strip().splitlines()[-5:]
        return record
    payload = json.loads(out.strip().splitlines()[-1])
    record.update(payload)
    return record


# --------------------------------------------------------------------------- report


def machine() -> dict:
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    return {"cpu": cpu_description(), "cores": os.cpu_count(), "mem_gb": round(mem_gb, 1), "gpu": "none",
            "python": platform.python_version(), "load_avg_at_start": os.getloadavg()}


def versions() -> dict:
    out = {}
    for mod in ("numpy", "faiss", "sklearn", "torch", "pytorch_metric_learning"):
        code = f"import {mod}; print({mod}.__version__)"
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        out[mod] = res.stdout.strip() or "unavailable"
    return out


def table(runs: list[dict]) -> str:
    head = (f"{'run':<22}{'wall s':>9}{'eval s':>9}{'eval CPU s':>12}{'RSS before MB':>15}{'peak RSS MB':>13}"
            f"{'P@1':>9}{'MAP@R':>9}{'NMI':>9}")
    lines = [head, "-" * len(head)]
    for r in runs:
        name = f"{r['kind']}{' +NMI' if r['nmi'] else ' kNN only'}"
        if "error" in r:
            lines.append(f"{name:<22}  failed: {r['error'][-1] if r['error'] else r['returncode']}")
            continue
        m = r["metrics"]
        p1 = m.get("precision@1", m.get("precision_at_1"))
        mapr = m.get("map@r", m.get("mean_average_precision_at_r"))
        nmi = m.get("nmi", m.get("NMI", float("nan")))
        lines.append(f"{name:<22}{r['wall_s']:>9.1f}{r['eval_s']:>9.1f}{r['eval_cpu_s']:>12.1f}{r['baseline_rss_mb']:>15.0f}{r['peak_rss_mb']:>13.0f}"
                     f"{p1:>9.4f}{mapr:>9.4f}{nmi:>9.4f}")
    return "\n".join(lines)


def agreement(ours: dict, pml: dict) -> dict:
    """|ours - PML| per shared metric (NMI differs by k-means seed, so it is only indicative)."""
    return {k: abs(ours["metrics"][k] - pml["metrics"][v]) for k, v in OURS_TO_PML.items()
            if k in ours.get("metrics", {}) and v in pml.get("metrics", {})}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=60_000)
    ap.add_argument("--classes", type=int, default=11_316)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ks", default="1,2,4,8")
    ap.add_argument("--no-nmi", action="store_true", help="kNN metrics only")
    ap.add_argument("--both-nmi-modes", action="store_true", help="measure with and without NMI")
    ap.add_argument("--repeat", type=int, default=1, help="runs per configuration; the fastest is reported")
    ap.add_argument("--skip-pml", action="store_true")
    ap.add_argument("--pml-k", choices=("max_bin_count", "none"), default="max_bin_count",
                    help="PML's k; its default (none = all N-1 neighbours) needs N*N*12 bytes")
    ap.add_argument("--pml-index", choices=("l2", "ip"), default="l2",
                    help="PML's kNN index: its default IndexFlatL2, or IndexFlatIP as evaluate() uses")
    ap.add_argument("--out", type=Path, default=OUT_DIR / "bench_metrics.json")
    ap.add_argument("--child", choices=("ours", "pml"), help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--make-data", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    ks = tuple(int(k) for k in args.ks.split(","))

    if args.make_data:  # plain .npy: loading makes one copy, so the children's RSS is honest
        x, y = make_data(args.n, args.classes, args.dim, args.seed)
        args.make_data.mkdir(parents=True, exist_ok=True)
        np.save(args.make_data / "x.npy", x)
        np.save(args.make_data / "y.npy", y)
        return 0
    if args.child:
        print(json.dumps(child(args.child, args.data, not args.no_nmi, ks, args.pml_k, args.pml_index)))
        return 0

    OUT_DIR.mkdir(parents=True, exist_ok=True)
    data = OUT_DIR / f"metrics_data_{args.n}_{args.classes}_{args.dim}_{args.seed}"
    if not (data / "y.npy").exists():
        # Generated in a subprocess: Linux carries a process's peak RSS across fork+exec, so
        # a parent that had held the data would inflate every child's measured peak.
        subprocess.run([sys.executable, __file__, "--make-data", str(data), "--n", str(args.n), "--classes",
                        str(args.classes), "--dim", str(args.dim), "--seed", str(args.seed)], check=True)
    sizes = np.bincount(np.load(data / "y.npy"))
    print(f"data: {args.n} x {args.dim}, {args.classes} classes, sizes {sizes.min()}-{sizes.max()} "
          f"(mean {sizes.mean():.2f}); dense N x N float32 would be {args.n ** 2 * 4 / 1e9:.1f} GB", flush=True)

    nmi_modes = [True, False] if args.both_nmi_modes else [not args.no_nmi]
    host = machine()  # before the runs, so the load average describes the starting conditions
    notes = []
    pml_dense_gb = args.n * (args.n - 1) * 12 / 1e9
    avail_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES") / 1e9
    skip_pml = args.skip_pml
    if not skip_pml and args.pml_k == "none" and pml_dense_gb > 0.5 * avail_gb:
        notes.append(f"PML with k=None would hold {pml_dense_gb:.1f} GB of kNN results "
                     f"(N x (N-1) int64 + float32) with {avail_gb:.1f} GB free: not run")
        skip_pml = True
    elif args.pml_k == "max_bin_count":
        notes.append(f"PML run with k='max_bin_count'; its default k=None returns all N-1 neighbours "
                     f"per query ({pml_dense_gb:.1f} GB of int64 ids + float32 distances at this N)")

    # Interleaved (ours, PML, ours, PML, ...) so background load on a shared machine hits
    # both sides alike; the fastest try of each configuration is reported.
    configs = [(nmi, kind) for nmi in nmi_modes for kind in ("ours",) + (() if skip_pml else ("pml",))]
    tries: dict = {c: [] for c in configs}
    for i in range(args.repeat):
        for nmi, kind in configs:
            print(f"running {kind} (nmi={nmi}) {i + 1}/{args.repeat} ...", flush=True)
            tries[(nmi, kind)].append(measure(kind, data, nmi, ks, args.pml_k, args.pml_index))
    runs = []
    for config in configs:
        ok = [t for t in tries[config] if "error" not in t]
        best = dict(min(ok, key=lambda t: t["wall_s"]) if ok else tries[config][-1])
        best["wall_s_all"] = [round(t["wall_s"], 2) for t in tries[config]]
        best["load_avg_1m_all"] = [t["load_avg_1m_before_after"] for t in tries[config]]
        runs.append(best)
    print(table(runs))

    summary = {}
    for nmi in nmi_modes:
        pair = {r["kind"]: r for r in runs if r["nmi"] == nmi and "error" not in r}
        if {"ours", "pml"} <= pair.keys():
            key = "with_nmi" if nmi else "knn_only"
            summary[key] = {
                "speedup_wall": pair["pml"]["wall_s"] / pair["ours"]["wall_s"],
                "speedup_eval": pair["pml"]["eval_s"] / pair["ours"]["eval_s"],
                "speedup_eval_cpu": pair["pml"]["eval_cpu_s"] / pair["ours"]["eval_cpu_s"],
                "rss_ratio": pair["pml"]["peak_rss_mb"] / pair["ours"]["peak_rss_mb"],
                "abs_diff": agreement(pair["ours"], pair["pml"]),
            }
            summary[key]["target_ours_le_half_pml_met"] = summary[key]["speedup_eval"] >= 2.0
            print(f"{key}: PML/ours wall {summary[key]['speedup_wall']:.2f}x, eval "
                  f"{summary[key]['speedup_eval']:.2f}x (CPU {summary[key]['speedup_eval_cpu']:.2f}x), peak RSS {summary[key]['rss_ratio']:.2f}x; "
                  f"|diff| {summary[key]['abs_diff']}")
    for note in notes:
        print("note:", note)

    report = {
        "params": {"n": args.n, "classes": args.classes, "dim": args.dim, "seed": args.seed, "ks": ks,
                   "class_size_min": int(sizes.min()), "class_size_max": int(sizes.max()),
                   "class_size_mean": float(sizes.mean()), "pml_k": args.pml_k,
                   "pml_index": args.pml_index},
        "dense_nxn_float32_gb": args.n ** 2 * 4 / 1e9,
        "machine": host,
        "versions": versions(),
        "runs": runs,
        "repeat": args.repeat,
        "summary": summary,
        "notes": notes,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
