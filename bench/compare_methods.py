"""Every training method on the same backbone, image size, sampler, augmentations and budget; N seeds.

    python bench/compare_methods.py --dataset flowers --dataset omniglot          # runs, then the table
    python bench/compare_methods.py --dataset flowers --table-only                # table from finished runs
    python bench/compare_methods.py --dataset omniglot --max-steps 3 --seeds 1 \\
        --runs-dir /tmp/cmp --summaries-dir /tmp/cmp/sum --results-md /tmp/cmp/RESULTS.md --chart '/tmp/cmp/{dataset}.png'   # smoke test
    python bench/compare_methods.py --dataset omniglot-lite0 --methods ibc --pml multi_similarity --seeds 1
                                                          # issue 10: does the Flowers Lite0 preset carry?

Methods: ``ibc``, ``ce``, ``group_loss``, ``divide_conquer`` with every seed; the classic losses
(``pml-<loss>``, pytorch-metric-learning) get a 1-seed screen (seed 0) and the best of them on
R@1 runs the remaining seeds too; the screen stays in the table. Each run is ``ibc-train --config
<preset> --set method.name=...`` in ``RUNS/<dataset>/<entry>-s<seed>``; its summary is one small JSON
file ``SUMMARIES/<dataset>/<entry>-s<seed>.json`` (``--summaries-dir``, by default ``bench/compare_runs/``,
which is committed: the run folders with their checkpoints are not). A run with a summary is never
repeated; one that was stopped (``last.pt``, no summary) continues with ``--resume``; so the
comparison can be spread over several sittings, and over sessions on fresh clones. The table (mean ± std of R@1/2/4/8, MAP@R, NMI and training minutes; the zero-shot
row when the backbone is pretrained) replaces this dataset's section of ``--results-md`` and a chart
of R@1 goes to ``--chart`` (one PNG per dataset). ``omniglot-lite0`` is the Flowers Lite0 preset carried
unchanged to Omniglot (see DATASET_SETS).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from sdk.cpu import cpu_description  # noqa: E402
PRESETS = {"flowers": "configs/flowers102-lite0-cpu.yaml", "omniglot": "configs/omniglot-cpu.yaml",
           "omniglot-lite0": "configs/flowers102-lite0-cpu.yaml"}
# A dataset's own overrides of its preset. ``omniglot-lite0`` is the carry-over check of issue 10: the
# Flowers Lite0 preset, chosen on Flowers' validation split, applied unchanged to a dataset it never
# saw, as a user with their own folder of images gets it. Omniglot's 771 training characters give 5x
# Flowers' images per epoch, so its budget is one epoch (482 steps against Flowers' 373), with the
# preset's frozen-backbone and warm-up shares of the schedule kept (0.5 and 0.3 of 4 epochs).
DATASET_SETS = {"omniglot-lite0": ["data.dataset=omniglot", "data.root=../shared/data/omniglot",
                                   "data.num_train_classes=null", "optim.epochs=1",
                                   "finetune.freeze_backbone_epochs=0.125", "optim.warmup_epochs=0.075"]}
CORE = ["ibc", "ce", "group_loss", "divide_conquer"]
PML_LOSSES = ["triplet", "contrastive", "multi_similarity", "proxy_anchor", "normalized_softmax", "arcface"]
KEYS = [("recall@1", "R@1"), ("recall@2", "R@2"), ("recall@4", "R@4"), ("recall@8", "R@8"), ("map@r", "MAP@R"),
        ("nmi", "NMI")]


def entry_sets(entry: str) -> list[str]:
    """The --set overrides that select one table entry's method."""
    if entry.startswith("pml-"):
        return ["method.name=pml", f"method.loss={entry[4:]}"]
    return [f"method.name={entry}"]


def summary_path(summaries: Path, dataset: str, entry: str, seed: int) -> Path:
    return summaries / dataset / f"{entry}-s{seed}.json"


def preset_digest(dataset: str, extra: list[str]) -> str:
    """What a summary was trained with: the preset file's bytes and the extra overrides."""
    h = hashlib.sha256((ROOT / PRESETS[dataset]).read_bytes())
    h.update(json.dumps(sorted(extra)).encode())
    return h.hexdigest()[:16]


def read_summary(path: Path, digest: str) -> dict | None:
    """A finished run's summary; None if absent or trained with another preset or other overrides."""
    if not path.is_file():
        return None
    r = json.loads(path.read_text())
    if r.get("preset_digest") != digest:
        print(f"  {path}: trained with another version of the preset or other overrides: left out", flush=True)
        return None
    return r


def dataset_sets(dataset: str, extra: list[str]) -> list[str]:
    """Every run's --set overrides for ``dataset`` besides the method's: the dataset's own, then the user's."""
    return DATASET_SETS.get(dataset, []) + extra


def run_one(runs: Path, summaries: Path, dataset: str, entry: str, seed: int, extra: list[str]) -> dict | None:
    """Train (or resume, or skip) one run; returns its summary, None if it failed. ``extra``: dataset_sets()."""
    summary = summary_path(summaries, dataset, entry, seed)
    digest = preset_digest(dataset, extra)
    done = read_summary(summary, digest)
    if done is not None:
        return done
    out = runs / dataset / f"{entry}-s{seed}"
    if summary.is_file() and out.is_dir():  # a stale run: keep it aside, never resume it under the new preset
        out.rename(out.with_name(f"{out.name}.stale-{int(time.time())}"))
    cmd = [sys.executable, "-m", "trainer.cli", "--config", PRESETS[dataset], "--out", str(out), "--seed", str(seed),
           "--set", "runtime.progress=false"]
    for s in entry_sets(entry) + extra:
        cmd += ["--set", s]
    if (out / "last.pt").is_file():
        cmd.append("--resume")
    print(" ".join(cmd), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(str(out) + ".log", "a") as log:
        rc = subprocess.call(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    print(f"  rc={rc} in {time.time() - t0:.0f}s", flush=True)
    final = out / "final_metrics.json"
    if rc != 0 or not final.is_file():
        return None
    d = json.loads(final.read_text())
    result = {"dataset": dataset, "entry": entry, "seed": seed, "test": d["test"], "baseline": d.get("baseline"),
              "epochs": d["epochs"], "steps": d["steps"], "train_time_s": d["train_time_s"],
              "stopped": d.get("stopped"), "load_avg_end": d.get("load_avg_end"), "cpu": cpu_description(),
              "config": PRESETS[dataset],
              "overrides": entry_sets(entry) + extra, "preset_digest": digest, "run": os.path.relpath(out, ROOT)}
    summary.parent.mkdir(parents=True, exist_ok=True)
    summary.write_text(json.dumps(result, indent=2))
    return result


def best_pml(results: list[dict]) -> str | None:
    screened = [r for r in results if r["entry"].startswith("pml-") and r["seed"] == 0]
    return max(screened, key=lambda r: r["test"]["recall@1"])["entry"] if screened else None


def _cell(vals: list[float]) -> str:
    """mean ± std over seeds; one seed (the screen) is its value alone: it has no spread to show."""
    if not vals:
        return "-"
    if len(vals) == 1:
        return f"{vals[0]:.2f}"
    return f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f}"


def table(dataset: str, results: list[dict]) -> str:
    rows = [r for r in results if r["dataset"] == dataset]
    cpu_labels = cpu_letters(rows)
    head = ["method", "seeds"] + [name for _, name in KEYS] + ["train min/run (median)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    baseline = next((r["baseline"]["test"] for r in rows if r.get("baseline")), None)
    if baseline:
        lines.append("| zero-shot (pretrained, no training) | - | "
                     + " | ".join(f"{100 * baseline[k]:.2f}" if k in baseline else "-" for k, _ in KEYS) + " | 0 |")
    entries = sorted(dict.fromkeys(r["entry"] for r in rows),
                     key=lambda e: -statistics.mean(100 * r["test"]["recall@1"] for r in rows if r["entry"] == e))
    for e in entries:
        rs = [r for r in rows if r["entry"] == e]
        cells = [e, ",".join(str(r["seed"]) for r in rs)]
        cells += [_cell([100 * r["test"][k] for r in rs if k in r["test"]]) for k, _ in KEYS]
        # the median: a run that shared the CPU with other work is slower, not the method
        tag = "".join(sorted({cpu_labels[_cpu(r)] for r in rs})) if len(cpu_labels) > 1 else ""
        cells.append(f"{statistics.median(r['train_time_s'] for r in rs) / 60:.1f}" + (f" ({tag})" if tag else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cpu(r: dict) -> str:
    return r.get("cpu", "CPU not recorded")


def cpu_letters(rows: list[dict]) -> dict[str, str]:
    """A letter per CPU the runs ran on (A, B, ...): the minutes column says which machine each row is from."""
    return {cpu: chr(ord("A") + i) for i, cpu in enumerate(sorted({_cpu(r) for r in rows}))}


def machine_note(rows: list[dict]) -> str:
    """The CPUs the runs ran on (each summary records its own) and how loaded the machine was."""
    letters = cpu_letters(rows)
    loads = [r["load_avg_end"][0] for r in rows if r.get("load_avg_end")]
    load = f"; 1-min load average at the end of the runs {min(loads):.1f}-{max(loads):.1f}" if loads else ""
    if len(letters) == 1:
        return f"CPU: {next(iter(letters))}{load} (a load above the core count means a shared machine)."
    named = "; ".join(f"({letter}) {cpu}" for cpu, letter in letters.items())
    return (f"CPUs: {named}{load} (a load above the core count means a shared machine). Training minutes are "
            f"comparable only between runs on the same CPU: the letter beside them says which.")


def write_section(md: Path, dataset: str, body: str) -> None:
    """Replace (or append) this dataset's marked section of the results file."""
    start, end = f"<!-- compare_methods:{dataset} -->", f"<!-- /compare_methods:{dataset} -->"
    block = f"{start}\n{body}\n{end}"
    text = md.read_text() if md.is_file() else ""
    if start in text and end in text:
        text = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + ("\n\n" if text else "") + block + "\n"
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(text)


def bar_chart(path: Path, rows: list[dict], dataset: str) -> None:
    """One dataset's test R@1 per method, best at the top: every seed a cross, the mean ± std a point with its value.

    Why points on a zoomed axis and not bars from 0: the methods differ by tenths of a point, which
    bars from 0 hide (they all look the same height), and a bar on a cut axis exaggerates.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    by_entry = {e: [100 * r["test"]["recall@1"] for r in rows if r["entry"] == e]
                for e in dict.fromkeys(r["entry"] for r in rows)}
    entries = sorted(by_entry, key=lambda e: statistics.mean(by_entry[e]))  # best at the top
    for y, e in enumerate(entries):
        vals = by_entry[e]
        mean, sd = statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0
        ax.errorbar([mean], [y], xerr=[sd], fmt="o", color=f"C{y % 10}", markersize=8, capsize=4)
        ax.plot(vals, [y - 0.22] * len(vals), "x", color=f"C{y % 10}", markersize=6, alpha=0.8)
        ax.annotate(f"{mean:.2f}" + (f" ± {sd:.2f}" if len(vals) > 1 else " (1 seed)"), (mean, y),
                    xytext=(0, 9), textcoords="offset points", ha="center", fontsize=8)
    base = next((r["baseline"]["test"]["recall@1"] for r in rows if r.get("baseline")), None)
    if base is not None:
        ax.axvline(100 * base, color="k", linestyle="--", linewidth=1, label=f"zero-shot {100 * base:.2f}")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_yticks(range(len(entries)), entries)
    ax.set_ylim(-0.6, len(entries) - 0.3)
    ax.set_xlabel("test R@1 (%): mean ± std over seeds; x = one seed")
    ax.set_title(dataset)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", action="append", choices=sorted(PRESETS), required=True)
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 for the core methods and the best PML loss")
    p.add_argument("--methods", default=",".join(CORE), help="comma list of core entries")
    p.add_argument("--pml", default=",".join(PML_LOSSES), help="PML losses to screen (comma list; '' = none)")
    p.add_argument("--epochs", type=int, default=None, help="override the preset's optim.epochs (the budget)")
    p.add_argument("--max-steps", type=int, default=None, help="stop every run after N steps (smoke tests)")
    p.add_argument("--set", dest="extra", action="append", default=[], help="extra --set for every run")
    p.add_argument("--runs-dir", default=str(ROOT / "runs" / "methods"), help="run folders (checkpoints, logs)")
    p.add_argument("--summaries-dir", default=str(ROOT / "bench" / "compare_runs"),
                   help="one JSON summary per finished run (committed, so later sittings resume)")
    p.add_argument("--results-md", default=str(ROOT / "bench" / "RESULTS.md"))
    p.add_argument("--chart", default=str(ROOT / "bench" / "compare_methods_{dataset}.png"),
                   help="R@1 chart of each dataset ({dataset} is replaced by its name)")
    p.add_argument("--table-only", action="store_true", help="no training: the table from finished runs")
    args = p.parse_args()
    extra = list(args.extra)
    if args.epochs is not None:
        extra.append(f"optim.epochs={args.epochs}")
    if args.max_steps is not None:
        extra.append(f"runtime.max_steps={args.max_steps}")
    runs, summaries = Path(args.runs_dir), Path(args.summaries_dir)
    core = [m for m in args.methods.split(",") if m]
    pml = [f"pml-{loss}" for loss in args.pml.split(",") if loss]
    seeds = list(range(args.seeds))
    results: list[dict] = []
    failed: list[str] = []

    def one(dataset: str, entry: str, seed: int) -> None:
        if args.table_only:
            sets = dataset_sets(dataset, extra)
            r = read_summary(summary_path(summaries, dataset, entry, seed), preset_digest(dataset, sets))
        else:
            r = run_one(runs, summaries, dataset, entry, seed, dataset_sets(dataset, extra))
            if r is None:
                failed.append(f"{dataset}/{entry}-s{seed}")
        if r is not None:
            results.append(r)

    for dataset in args.dataset:
        for entry in pml:  # the 1-seed screen first: it decides which classic loss gets all seeds
            one(dataset, entry, 0)
        best = best_pml([r for r in results if r["dataset"] == dataset])
        for seed in seeds:
            for entry in core + ([best] if best else []):
                if entry == best and seed == 0:
                    continue
                one(dataset, entry, seed)
    for dataset in args.dataset:
        rows = [r for r in results if r["dataset"] == dataset]
        if not rows:
            continue
        budget = sorted({f"{r['epochs']} epochs / {r['steps']} steps" for r in rows})
        chart = Path(args.chart.replace("{dataset}", dataset))
        bar_chart(chart, rows, dataset)
        sets = DATASET_SETS.get(dataset)
        body = (f"### Methods compared: {dataset} ({PRESETS[dataset]}"
                + (f" with {', '.join(f'`{x}`' for x in sets)}" if sets else "") + ")\n\n"
                f"`{shlex.join(['python', 'bench/compare_methods.py', *sys.argv[1:]])}`; same backbone, image size, sampler, "
                f"augmentations and budget for every method ({', '.join(budget)}); test classes; mean ± std over "
                f"seeds; the classic losses screened with seed 0, the best with all seeds. "
                f"{machine_note(rows)}\n\n{table(dataset, rows)}\n\n![R@1 by method]({os.path.relpath(chart, Path(args.results_md).parent)})")
        write_section(Path(args.results_md), dataset, body)
        print(f"\n{dataset}\n{table(dataset, rows)}")
    if failed:
        print("failed runs (see their .log): " + ", ".join(failed), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
