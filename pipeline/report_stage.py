"""Stage 5, report: ``OUT/report/report.json`` (every number shown) and a static ``index.html``.

Why the page is rendered from report.json: what a person reads and what a script checks are the
same numbers. Numbers are recomputed where that is cheap and independent of the stage that made
them: NMI (and R@K, MAP@R, checked against the exporter's) from the saved embeddings of every
variant. The page needs no server and no internet: pictures are PNG/JPEG files beside it.
"""

from __future__ import annotations

import json
import logging
import os
import time

import numpy as np

from pipeline.context import Context, read_json, write_json
from pipeline.machine import machine_summary
from pipeline.state import STAGES, read_done

log = logging.getLogger("pipeline.report")

THUMB = 128


def inputs(ctx: Context) -> dict:
    return {"grid_queries": ctx.opts.grid_queries, "tsne_points": ctx.opts.tsne_points, "seed": ctx.opts.seed}


# ----------------------------------------------------------------------------------------- pieces
def config_summary(cfg, opts) -> dict:
    m, d, o, s = cfg.model, cfg.data, cfg.optim, cfg.sampler
    return {"preset": cfg.name or os.path.basename(opts.config_path()), "config_file": opts.config_path(),
            "overrides": " ".join(f"--set {o}" for o in opts.overrides), "dataset": d.dataset, "data_root": d.root,
            "backbone": m.backbone, "pretrained": bool(m.pretrained), "embed_dim": m.embed_dim,
            "use_mpn": m.use_mpn, "train_image_size": cfg.augment.size,
            "eval_preprocess": f"resize {cfg.preprocess.resize}, crop {cfg.preprocess.crop}",
            "epochs": o.epochs, "max_steps": cfg.runtime.max_steps, "batch": f"{s.classes_per_batch} classes x "
            f"{s.images_per_class} images", "lr": o.lr, "schedule": o.schedule, "val_fraction": d.val_fraction,
            "seed": cfg.runtime.seed, "threads": cfg.runtime.threads}


def baseline_metrics(final: dict) -> dict | None:
    """The zero-shot (pretrained, before training) test metrics, when the trainer recorded them."""
    b = final.get("baseline")
    if not isinstance(b, dict):
        return None
    inner = b.get("test") if isinstance(b.get("test"), dict) else b
    return {k: float(v) for k, v in inner.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def variant_metrics(emb_dir: str, name: str, ks, seed: int) -> dict | None:
    """R@K, MAP@R and NMI of one variant, recomputed from its saved parity embeddings."""
    from sdk.metrics import evaluate

    path = os.path.join(emb_dir, f"{name}.npy")
    if not os.path.isfile(path):
        return None
    labels = np.asarray(read_json(os.path.join(emb_dir, "parity.json"))["labels"], np.int64)
    emb = np.load(path)
    if not np.isfinite(emb).all():
        return None
    m = evaluate(emb, labels, ks=tuple(ks), nmi=True, seed=seed)
    return {k: float(v) for k, v in m.items() if isinstance(v, float)}


def metrics_table(ctx: Context, export: dict, final: dict) -> dict:
    ks = export.get("ks") or [1, 2, 4, 8]
    seed = ctx.config.runtime.seed
    emb_dir = export.get("embeddings_dir", "")
    rows = []
    base = baseline_metrics(final)
    if base:
        rows.append({"name": "zero-shot (pretrained backbone, before training)", "kind": "baseline",
                     "metrics": base, "status": "starting point"})
    ref = export.get("reference", {})
    ref_m = variant_metrics(emb_dir, "pytorch-fp32", ks, seed) or dict(ref.get("metrics", {}))
    rows.append({"name": "pytorch-fp32 (trained, reference)", "kind": "reference", "metrics": ref_m,
                 "size_mb": (ref.get("size_bytes") or 0) / 1e6 or None, "status": "reference",
                 "recall1_drop": 0.0, "cosine_mean": 1.0})
    for v in export.get("variants", []):
        m = variant_metrics(emb_dir, v["name"], ks, seed) or dict(v["metrics"])
        exported = v.get("metrics") or {}
        if "recall@1" in exported and "recall@1" in m and abs(m["recall@1"] - exported["recall@1"]) > 1e-6:
            log.warning("report: %s R@1 recomputed %.6f differs from the exporter's %.6f", v["name"], m["recall@1"],
                        exported["recall@1"])
        rows.append({"name": v["name"], "kind": "variant", "metrics": m, "recall1_drop": v["recall1_drop"],
                     "cosine_mean": v["cosine_mean"], "cosine_p1": v["cosine_p1"], "tolerance": v["tolerance"],
                     "size_mb": (v.get("size_bytes") or 0) / 1e6 or None, "images_per_s": v.get("images_per_s"),
                     "status": "pass" if v["passed"] else "FAIL", "reason": v.get("reason", ""),
                     "in_bundle": v.get("in_bundle", False)})
    parity_n = None
    if emb_dir and os.path.isfile(os.path.join(emb_dir, "parity.json")):
        parity_n = len(read_json(os.path.join(emb_dir, "parity.json"))["labels"])
    return {"ks": list(ks), "rows": rows, "parity_images": parity_n,
            "note": "R@K, MAP@R and NMI recomputed from each variant's saved embeddings of the held-out parity set; "
                    "drop = PyTorch R@1 minus the variant's, in points; images/s = the model alone on "
                    "preprocessed batches of 32 (the exporter's measurement)"}


def _thumb(src: str, dst: str) -> str | None:
    from PIL import Image

    try:
        with Image.open(src) as im:
            im = im.convert("RGB")
            im.thumbnail((THUMB, THUMB))
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            im.save(dst, "JPEG", quality=85)
        return dst
    except OSError as e:
        log.warning("report: cannot make a thumbnail of %s: %s", src, e)
        return None


def query_grid(ctx: Context, report_dir: str, n_rows: int) -> list[dict]:
    """The first query of ``n_rows`` different classes (seeded), with its top-5 hits, as thumbnails."""
    path = os.path.join(ctx.out, "query", "hits.json")
    if not os.path.isfile(path):
        return []
    records = read_json(path)
    rng = np.random.default_rng(ctx.opts.seed)
    by_class: dict[str, dict] = {}
    for i in rng.permutation(len(records)).tolist():
        by_class.setdefault(records[i]["label"], records[i])
    chosen = [by_class[c] for c in sorted(by_class)][:n_rows]
    grid = []
    for qi, rec in enumerate(chosen):
        q = _thumb(rec["query"], os.path.join(report_dir, "assets", "thumbs", f"q{qi}.jpg"))
        hits = []
        for hi, h in enumerate(rec["hits"][:5]):
            t = _thumb(h["path"], os.path.join(report_dir, "assets", "thumbs", f"q{qi}-hit{hi + 1}.jpg")) \
                if h.get("path") else None
            hits.append({"rank": hi + 1, "id": h["id"], "label": h["label"], "score": h["score"],
                         "correct": bool(h["correct"]), "thumb": os.path.relpath(t, report_dir) if t else None})
        grid.append({"query": rec["query"], "label": rec["label"],
                     "thumb": os.path.relpath(q, report_dir) if q else None, "hits": hits})
    return grid


def stage_times(out: str) -> list[dict]:
    rows = []
    for s in STAGES:
        d = read_done(out, s)
        if d is not None:
            skipped = (d.get("summary") or {}).get("skipped")  # a stage's reason; export lists variants here
            rows.append({"stage": s, "seconds": d.get("seconds"), "finished_at": d.get("finished_at"),
                         "status": "skipped" if isinstance(skipped, str) else "done"})
    return rows


# ------------------------------------------------------------------------------------------- run
def run(ctx: Context) -> dict:
    from pipeline import figures
    from pipeline.report_html import render

    out = ctx.dir("report")
    assets = os.path.join(out, "assets")
    os.makedirs(assets, exist_ok=True)
    train_dir = ctx.train_dir
    final = read_json(os.path.join(train_dir, "final_metrics.json"))
    history = []
    if os.path.isfile(os.path.join(train_dir, "metrics.jsonl")):
        with open(os.path.join(train_dir, "metrics.jsonl")) as f:
            history = [json.loads(line) for line in f if line.strip()]
    export = ctx.summary("export") or {}
    catalogue = ctx.summary("catalogue") or {}
    query = ctx.summary("query") or {}

    table = metrics_table(ctx, export, final)
    from trainer.methods import get_method

    parts = get_method(ctx.config.method.name).loss_parts(ctx.config.method)
    curves = {"loss": figures.loss_curve(history, os.path.join(assets, "loss.png"), parts),
              "recall": figures.recall_curve(history, os.path.join(assets, "recall.png"))}
    tsne = None
    emb_dir = export.get("embeddings_dir", "")
    ref_path = os.path.join(emb_dir, "pytorch-fp32.npy")
    if os.path.isfile(ref_path):
        labels = np.asarray(read_json(os.path.join(emb_dir, "parity.json"))["labels"], np.int64)
        t0 = time.perf_counter()
        tsne = figures.tsne_map(np.load(ref_path), labels, os.path.join(assets, "tsne.png"),
                                max_points=ctx.opts.tsne_points, seed=ctx.opts.seed)
        tsne.update({"image": "assets/tsne.png", "embeddings": "pytorch-fp32 (held-out parity set)",
                     "seconds": round(time.perf_counter() - t0, 1)})
    speed_rows = [(r["name"], r.get("images_per_s")) for r in table["rows"] if r["kind"] == "variant"]
    idx = (catalogue.get("speed") or {}) if not catalogue.get("skipped") else {}
    if idx:
        speed_rows += [(f"index: decode alone ({idx.get('decode_workers')} workers)", idx.get("decode_images_per_s")),
                       (f"index: model alone ({catalogue.get('variant')})", idx.get("model_images_per_s")),
                       ("index: decode + model (end to end)", idx.get("index_images_per_s"))]
    speed_drawn = figures.speed_bars(speed_rows, os.path.join(assets, "throughput.png"),
                                     "embedding throughput per variant, and indexing")
    grid = query_grid(ctx, out, ctx.opts.grid_queries) if query and not query.get("skipped") else []
    failed = [r["name"] for r in table["rows"] if r.get("status") == "FAIL"]
    passed = [r["name"] for r in table["rows"] if r.get("status") == "pass"]
    report = {
        "title": f"ibc run: {ctx.config.name or 'custom config'} on {ctx.config.data.dataset}",
        "generated_at": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "run_folder": os.path.abspath(ctx.out),
        "status": {"variants_passed": passed, "variants_failed": failed, "bundle": export.get("bundle"),
                   "gate_failure": export.get("gate_failure", "")},
        "config": config_summary(ctx.config, ctx.opts),
        "machine": machine_summary(),
        "env": {k: v for k, v in (final.get("env") or {}).items() if k in (
            "torch", "torchvision", "onnxruntime", "openvino", "faiss-cpu", "numpy", "platform", "device",
            "torch_threads")},
        "stages": stage_times(ctx.out),
        "metrics": table,
        "training": {"final_test": final.get("test", {}), "model": final.get("model"),
                     "protocol": final.get("protocol"), "epochs": final.get("epochs"), "steps": final.get("steps"),
                     "train_time_s": final.get("train_time_s"),
                     "history": [{k: r.get(k) for k in ("epoch", "loss", "loss_backbone", "loss_mpn", "val/recall@1",
                                                       "test/recall@1", "images_per_s", "epoch_time_s") if k in r}
                                 for r in history],
                     "curves": {"loss": "assets/loss.png", "recall": "assets/recall.png"},
                     "curve_points": curves},
        "tsne": tsne,
        "queries": ({"variant": query.get("variant"), "count": query.get("queries"),
                     "gallery": catalogue.get("gallery"), "metrics": query.get("metrics"),
                     "catalogue_recall": query.get("catalogue_recall"), "grid": grid}
                    if query and not query.get("skipped") else {"skipped": query.get("skipped") or "not run"}),
        "throughput": {"rows": speed_drawn, "image": "assets/throughput.png",
                       "indexing": idx or None,
                       "note": "variants: the model alone on preprocessed batches of 32 (exporter); indexing: "
                               "the SDK's Retriever on the gallery images, decoding measured alone, the model alone, "
                               "and both together"},
    }
    write_json(os.path.join(out, "report.json"), report)
    render(report, os.path.join(out, "index.html"))
    log.info("report: %s", os.path.join(out, "index.html"))
    return {"html": os.path.join(out, "index.html"), "json": os.path.join(out, "report.json"),
            "variants_passed": passed, "variants_failed": failed}


__all__ = ["run", "inputs", "metrics_table", "variant_metrics", "baseline_metrics"]
