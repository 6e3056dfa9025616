"""Stage 4, query: search the catalogue with the held-out queries (none of them is in it).

Records each query's hits (id, score, class, image path) and the retrieval metrics of the queries
against the gallery, from the embeddings the SDK made (kept on disk for the report).
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np

from pipeline.context import Context, read_json, write_json
from pipeline.data import class_name
from pipeline.errors import PipelineError

log = logging.getLogger("pipeline.query")


def inputs(ctx: Context) -> dict:
    return {}


def run(ctx: Context) -> dict:
    from sdk.metrics import evaluate
    from sdk.retriever import Retriever

    cat = ctx.summary("catalogue")
    if not cat:
        raise PipelineError("query: the catalogue stage has not run")
    out = ctx.dir("query")
    split = read_json(os.path.join(ctx.out, "catalogue", "split.json"))
    queries = [(p, int(y)) for p, y in split["queries"]]
    paths = [p for p, _ in queries]
    qlabels = np.asarray([y for _, y in queries], np.int64)
    ks = tuple((ctx.summary("export") or {}).get("ks") or (1, 2, 4, 8))
    k_hits = max(max(ks), 5)
    with Retriever.load(cat["catalogue"], threads=ctx.threads()) as r:
        t0 = time.perf_counter()
        qvecs = r.embed(paths)
        hits = r.search(qvecs, k=k_hits)
        seconds = time.perf_counter() - t0
        variant = r.variant.name
    gallery_paths = {p for p, _ in split["gallery"]}
    leaked = [p for p in paths if p in gallery_paths]
    if leaked:  # the split guarantees this; checked because the whole report relies on it
        raise PipelineError(f"query: {len(leaked)} queries are also in the catalogue, e.g. {leaked[0]}")
    records = []
    for (p, y), row in zip(queries, hits):
        records.append({"query": p, "label": class_name(p), "hits": [
            {"id": h.id, "score": round(float(h.score), 6), "label": (h.metadata or {}).get("label"),
             "path": (h.metadata or {}).get("path"), "correct": (h.metadata or {}).get("label") == class_name(p)}
            for h in row]})
    write_json(os.path.join(out, "hits.json"), records)
    np.save(os.path.join(out, "query_embeddings.npy"), qvecs.astype(np.float32))
    np.save(os.path.join(out, "query_labels.npy"), qlabels)
    gvecs = np.load(os.path.join(ctx.out, "catalogue", "gallery_embeddings.npy"))
    glabels = np.load(os.path.join(ctx.out, "catalogue", "gallery_labels.npy"))
    metrics = evaluate(qvecs, qlabels, gvecs, glabels, ks=ks, nmi=False)
    hit_recall = {f"recall@{k}": float(np.mean([any(h["correct"] for h in rec["hits"][:k]) for rec in records]))
                  for k in ks}
    log.info("query: %d held-out queries against %d gallery images with %s: R@1 %.2f (catalogue search)",
             len(queries), len(gvecs), variant, 100 * hit_recall[f"recall@{ks[0]}"])
    return {"variant": variant, "queries": len(queries), "k": k_hits, "seconds": round(seconds, 3),
            "metrics": {k: v for k, v in metrics.items() if isinstance(v, float)},
            "catalogue_recall": hit_recall}


__all__ = ["run", "inputs"]
