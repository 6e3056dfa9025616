"""Stage 3, catalogue: index the gallery of the held-out classes with the bundle (through the SDK).

The held-out images are split per class into a gallery (indexed here) and queries (searched in
the query stage, never indexed). The stage also takes the indexing speed apart (decode vs model,
:mod:`pipeline.throughput`) and keeps the gallery embeddings for the report.
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np

from pipeline.context import Context, write_json
from pipeline.data import class_name, held_out_split
from pipeline.errors import PipelineError
from pipeline.logs import bars_wanted
from pipeline.throughput import decode_rate, model_rate

log = logging.getLogger("pipeline.catalogue")

SPEED_SAMPLE = 256  # images for the decode-alone / model-alone measurements


def inputs(ctx: Context) -> dict:
    return {"queries_per_class": ctx.opts.queries_per_class, "seed": ctx.opts.seed, "threads": ctx.threads()}


def held_out_items(ctx: Context) -> list[tuple[str, int]]:
    from trainer.data import dataset_items

    dc = ctx.config.data
    if dc.dataset == "inshop":
        return dataset_items(dc, "query") + dataset_items(dc, "gallery")
    return dataset_items(dc, "test")


def run(ctx: Context) -> dict:
    from sdk.retriever import Retriever

    export = ctx.summary("export") or {}
    if not export.get("bundle"):
        raise PipelineError("catalogue: the export stage wrote no bundle (no variant passed its gate)")
    out = ctx.dir("catalogue")
    gallery, queries = held_out_split(held_out_items(ctx), ctx.opts.queries_per_class, ctx.opts.seed)
    if not queries:
        raise PipelineError("catalogue: no held-out class has 2 or more images; nothing to query")
    write_json(os.path.join(out, "split.json"), {
        "gallery": [[p, y] for p, y in gallery], "queries": [[p, y] for p, y in queries],
        "rule": f"per held-out class, {ctx.opts.queries_per_class} seeded images (seed {ctx.opts.seed}) are queries; "
                "the rest is the gallery; queries are never indexed"})
    paths = [p for p, _ in gallery]
    root = os.path.commonpath([os.path.dirname(p) for p in paths]) if len(paths) > 1 else os.path.dirname(paths[0])
    ids = [os.path.relpath(p, root) for p in paths]
    meta = [{"path": p, "label": class_name(p)} for p in paths]
    with Retriever.from_bundle(export["bundle"], threads=ctx.threads()) as r:
        t0 = time.perf_counter()
        vecs = r.embed(paths, batch_size=32, progress=bars_wanted())
        t_embed = time.perf_counter() - t0
        r.add(vecs, ids=ids, metadata=meta)
        t_total = time.perf_counter() - t0
        r.save(os.path.join(out, "index"))
        sample = paths[:SPEED_SAMPLE]
        speed = {
            "images": len(paths),
            "index_images_per_s": len(paths) / max(t_total, 1e-9),
            "embed_images_per_s": len(paths) / max(t_embed, 1e-9),
            "decode_images_per_s": _safe(lambda: decode_rate(r, sample)),
            "model_images_per_s": _safe(lambda: model_rate(r, sample)),
            "decode_workers": r.decode_workers,
            "sample_images": len(sample),
        }
        info = r.info()
    speed["index_vs_model"] = (speed["index_images_per_s"] / speed["model_images_per_s"]
                               if speed.get("model_images_per_s") else None)
    np.save(os.path.join(out, "gallery_embeddings.npy"), vecs.astype(np.float32))
    np.save(os.path.join(out, "gallery_labels.npy"), np.asarray([y for _, y in gallery], np.int64))
    log.info("catalogue: indexed %d gallery images with %s at %.1f images/s (decode alone %.1f, model alone %.1f)",
             len(paths), info["variant"], speed["index_images_per_s"], speed["decode_images_per_s"] or 0,
             speed["model_images_per_s"] or 0)
    return {"variant": info["variant"], "reason": info["reason"], "index_kind": info["catalog"].get("index")
            if isinstance(info.get("catalog"), dict) else None, "gallery": len(gallery), "queries": len(queries),
            "classes": len({y for _, y in gallery}), "catalogue": os.path.join(out, "index"), "speed": speed,
            "threads": ctx.threads()}


def _safe(fn):
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - a measurement must not end the run
        log.warning("catalogue: a speed measurement failed: %s", e)
        return None


__all__ = ["run", "inputs"]
