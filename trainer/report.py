"""What a run tells: the per-epoch record (keyed by the parts the method reports), its log line,
the metrics log, the plots, the model-selection decision and the final test-class report."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

log = logging.getLogger("trainer")


def protocol_of(dc, has_val: bool) -> tuple[str, str | None]:
    """(how the reported model is chosen, in words; the selection split or None)."""
    if dc.select_on == "test":
        return "paper protocol: model selected on the TEST classes (optimistic)", "test"
    if has_val:
        return "validation split of the training classes", ("val" if dc.val_fraction > 0 else None)
    return ("no validation split: the final epoch's model is reported; test classes used only for the report",
            "val" if dc.val_fraction > 0 else None)


def epoch_record(state, optimizer, parts: dict[str, str]) -> dict[str, Any]:
    """The metrics-log record of the epoch that just ended (means over its steps)."""
    s = state.epoch_stats
    n = max(1, s["n"])
    lrs = {g.get("name"): g["lr"] for g in optimizer.param_groups}
    record: dict[str, Any] = {"epoch": state.epoch + 1, "step": state.step,
                              "lr": lrs.get("head", optimizer.param_groups[-1]["lr"]),
                              "lr_backbone": optimizer.param_groups[0]["lr"], "loss": s["loss"] / n}
    if "method" in lrs:
        record["lr_method"] = lrs["method"]
    for k in parts:
        record[k] = None if s.get(k) is None else s[k] / n
    record["images_per_s"] = s["images"] / max(1e-9, s["time"])
    record["epoch_time_s"] = s["time"]
    return record


def epoch_line(record: dict, parts: dict[str, str], sel_split: str | None, improved: bool) -> str:
    shown = [f"{label} {record[k]:.4f}" for k, label in parts.items() if record.get(k) is not None]
    msg = (f"epoch {record['epoch']}: loss {record['loss']:.4f}" + (f" ({', '.join(shown)})" if shown else "")
           + f", {record['images_per_s']:.1f} img/s")
    if sel_split and f"{sel_split}/recall@1" in record:
        msg += f", {sel_split} R@1 {100 * record[f'{sel_split}/recall@1']:.2f}"
        if f"{sel_split}/map@r" in record:
            msg += f", MAP@R {100 * record[f'{sel_split}/map@r']:.2f}"
        msg += " (best)" if improved else ""
    return msg


def write_jsonl(path: str, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def rewrite_jsonl(path: str, records: list[dict]) -> None:
    """The metrics log from a resumed checkpoint's history (drops records written after it)."""
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def draw_plots(history: list[dict], out_dir: str, parts: dict[str, str], final: dict | None = None) -> None:
    try:
        from trainer.plots import plot_metrics

        plot_metrics(history, os.path.join(out_dir, "plots"), final=final, parts=parts)
    except Exception as e:  # noqa: BLE001 - a plot must never end a run
        log.warning("could not draw plots: %s", e)


def fmt_table(rows: list[tuple[str, dict]] | dict, title: str) -> str:
    """A plain-text metrics table: one row per (name, metrics) pair, values in percent."""
    if isinstance(rows, dict):
        rows = [("", rows)]
    first = rows[0][1]
    keys = [k for k in first if k.startswith("recall@")] + [k for k in ("precision@1", "map@r", "r_precision", "nmi")
                                                            if k in first]
    names = [k.replace("recall@", "R@").replace("precision@1", "P@1").replace("map@r", "MAP@R")
             .replace("r_precision", "RP").replace("nmi", "NMI") for k in keys]
    widths = [max(6, len(n)) for n in names]
    label_w = max(len(r[0]) for r in rows)
    head = " " * label_w + (" | " if label_w else "") + " | ".join(n.rjust(w) for n, w in zip(names, widths))
    lines = [title, head, "-" * len(head)]
    for label, m in rows:
        vals = " | ".join((f"{100 * m[k]:.2f}" if k in m else "-").rjust(w) for k, w in zip(keys, widths))
        lines.append(label.ljust(label_w) + (" | " if label_w else "") + vals)
    return "\n".join(lines)


def final_report(out_dir: str, final: dict, history: list[dict], parts: dict[str, str], title: str) -> None:
    """Write final_metrics.json, the plots with the test stars, and log the table (with the starting point)."""
    with open(os.path.join(out_dir, "final_metrics.json"), "w") as f:
        json.dump(final, f, indent=2)
    draw_plots(history, out_dir, parts, final=final["test"] or None)
    if not final["test"]:
        log.info("test classes not evaluated (runtime.test_report=false); best %s %s: %s",
                 final.get("selection_split"), final.get("selection_metric"),
                 final.get(f"best_selection_{final.get('selection_metric')}"))
        return
    baseline = (final.get("baseline") or {}).get("test")
    rows = ([("starting point (pretrained, untrained)", baseline)] if baseline else []) + [("trained", final["test"])]
    log.info("\n%s", fmt_table(rows, title))


__all__ = ["protocol_of", "epoch_record", "epoch_line", "write_jsonl", "rewrite_jsonl", "draw_plots", "fmt_table",
           "final_report"]
