"""MPN on vs off (the CE-only ablation), same preset, 3 seeds, run one after another.

    python bench/train_comparison.py --dataset flowers --dataset omniglot        # runs, then the table
    python bench/train_comparison.py --dataset flowers --table-only              # table from finished runs
    python bench/train_comparison.py --dataset flowers-lite0                     # pretrained: + zero-shot row

Each run is ``ibc-train --config configs/<preset> --out runs/cmp/<dataset>-<mpn|ce>-s<seed>``; a run
whose ``final_metrics.json`` exists is not repeated. Writes ``bench/out/train_comparison.json`` and
prints a Markdown table of test Recall@K / MAP@R / NMI as mean ± std over the seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRESETS = {"flowers": "configs/flowers102-cpu.yaml", "omniglot": "configs/omniglot-cpu.yaml",
           "flowers-lite0": "configs/flowers102-lite0-cpu.yaml"}


def run_dir(dataset: str, mpn: bool, seed: int) -> Path:
    return ROOT / "runs" / "cmp" / f"{dataset}-{'mpn' if mpn else 'ce'}-s{seed}"


def run_one(dataset: str, mpn: bool, seed: int, extra: list[str]) -> dict:
    out = run_dir(dataset, mpn, seed)
    final = out / "final_metrics.json"
    if not final.is_file():
        cmd = [sys.executable, "-m", "trainer.cli", "--config", PRESETS[dataset], "--out", str(out),
               "--seed", str(seed), "--set", f"model.use_mpn={'true' if mpn else 'false'}",
               "--set", "runtime.progress=false", *extra]
        print(" ".join(cmd), flush=True)
        t0 = time.time()
        os.makedirs(out, exist_ok=True)
        with open(str(out) + ".log", "w") as log:
            rc = subprocess.call(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        print(f"  rc={rc} in {time.time() - t0:.0f}s", flush=True)
        if rc != 0:
            return {"dataset": dataset, "mpn": mpn, "seed": seed, "error": f"exit code {rc}"}
    d = json.loads(final.read_text())
    hist = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"dataset": dataset, "mpn": mpn, "seed": seed, "test": d["test"], "epochs": d["epochs"],
            "baseline": (d.get("baseline") or {}).get("test"),
            "steps": d["steps"], "train_time_s": d["train_time_s"], "eval_time_s": d.get("eval_time_s"),
            "images_per_s": [r.get("images_per_s") for r in hist], "out": str(out.relative_to(ROOT)),
            "config": str(PRESETS[dataset])}


def table(results: list[dict]) -> str:
    lines = []
    for dataset in dict.fromkeys(r["dataset"] for r in results):
        rows = [r for r in results if r["dataset"] == dataset and "test" in r]
        if not rows:
            continue
        keys = [k for k in rows[0]["test"] if k.startswith("recall@")] + [k for k in ("map@r", "nmi")
                                                                          if k in rows[0]["test"]]
        head = ["variant", "seeds"] + [k.replace("recall@", "R@").replace("map@r", "MAP@R").replace("nmi", "NMI")
                                       for k in keys] + ["train min/run"]
        lines += [f"**{dataset}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        base = next((r["baseline"] for r in rows if r.get("baseline")), None)
        if base:  # the same weights and images for every seed: one number
            lines.append("| " + " | ".join(["zero-shot (ImageNet weights, no training)", "-"]
                                           + [f"{100 * base[k]:.2f}" for k in keys] + ["0"]) + " |")
        for mpn in (True, False):
            rs = [r for r in rows if r["mpn"] == mpn]
            if not rs:
                continue
            cells = ["MPN on (IBC)" if mpn else "MPN off (CE only)", ",".join(str(r["seed"]) for r in rs)]
            for k in keys:
                vals = [100 * r["test"][k] for r in rs]
                sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
                cells.append(f"{statistics.mean(vals):.2f} ± {sd:.2f}")
            cells.append(f"{statistics.mean(r['train_time_s'] for r in rs) / 60:.1f}")
            lines.append("| " + " | ".join(cells) + " |")
        per_seed = {(r["mpn"], r["seed"]): 100 * r["test"]["recall@1"] for r in rows}
        seeds = sorted({r["seed"] for r in rows})
        lines += ["", "R@1 per seed (on / off): " + ", ".join(
            f"s{s}: {per_seed.get((True, s), float('nan')):.2f} / {per_seed.get((False, s), float('nan')):.2f}"
            for s in seeds), ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", action="append", choices=sorted(PRESETS), required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--table-only", action="store_true")
    p.add_argument("--set", dest="extra", action="append", default=[], help="extra --set for every run")
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "train_comparison.json"))
    args = p.parse_args()
    extra = [a for s in args.extra for a in ("--set", s)]
    results = []
    for dataset in args.dataset:
        for seed in args.seeds:
            for mpn in (True, False):
                if args.table_only and not (run_dir(dataset, mpn, seed) / "final_metrics.json").is_file():
                    continue
                results.append(run_one(dataset, mpn, seed, extra))
                os.makedirs(os.path.dirname(args.out), exist_ok=True)
                Path(args.out).write_text(json.dumps(results, indent=2))
    print(table(results))


if __name__ == "__main__":
    main()
