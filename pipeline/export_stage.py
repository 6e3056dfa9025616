"""Stage 2, export: the trained checkpoint -> a bundle of the variants that pass their gate.

Why a failing variant does not stop the run: a variant that loses more Recall@1 than its
tolerance is a finding. The bundle ships the passing variants, the stage records every
variant's numbers (and keeps the parity embeddings, so the report can recompute them), and the
run goes on; only when no variant passes is there nothing for the later stages to use.
"""

from __future__ import annotations

import logging
import os

from pipeline.context import Context, write_json
from pipeline.logs import bars_wanted

log = logging.getLogger("pipeline.export")


def inputs(ctx: Context) -> dict:
    return {"export": ctx.opts.export.record()}


def _variant_row(v, result) -> dict:
    p = v.parity
    return {"name": v.name, "backend": v.backend, "precision": v.precision, "passed": bool(p.passed),
            "reason": p.reason, "metrics": dict(p.metrics or {}), "recall1_drop": p.recall1_drop,
            "drops": dict(p.drops or {}), "cosine_mean": p.cosine_mean, "cosine_p1": p.cosine_p1,
            "tolerance": p.tolerance, "size_bytes": result.sizes.get(v.name),
            "images_per_s": v.images_per_s, "in_bundle": v.name in result.written, "notes": v.notes}


def run(ctx: Context) -> dict:
    from export.api import export_bundle
    from export.errors import GateFailure

    train = ctx.summary("train") or {}
    ckpt = train.get("best_checkpoint") or os.path.join(ctx.train_dir, "best.pt")
    out = ctx.dir("export")
    eo = ctx.opts.export
    emb_dir = os.path.join(out, "embeddings")
    failure = ""
    try:
        result = export_bundle(ckpt, ctx.bundle_dir, backends=eo.backends, precisions=eo.precisions,
                               tolerance=eo.tolerance, parity_limit=eo.parity_limit, calib_size=eo.calib_size,
                               val_limit=eo.val_limit, batch_size=eo.batch_size, overwrite=True,
                               seed=ctx.opts.seed, progress=bars_wanted(), embeddings_dir=emb_dir, **eo.extra)
    except GateFailure as e:
        if e.result is None:
            raise
        result, failure = e.result, str(e)
    rows = [_variant_row(v, result) for v in result.variants]
    for r in rows:
        m = r["metrics"]
        log.info("export: %s %s, R@1 %s (drop %+.2f points, tolerance %g), %s images/s%s", r["name"],
                 "PASS" if r["passed"] else "FAIL", f"{100 * m['recall@1']:.2f}" if "recall@1" in m else "-",
                 r["recall1_drop"], r["tolerance"], f"{r['images_per_s']:.1f}" if r["images_per_s"] else "-",
                 f" ({r['reason']})" if r["reason"] else "")
    passed = [r["name"] for r in rows if r["passed"]]
    summary = {
        "bundle": result.out,  # None when no variant passed
        "ks": list(result.ks),
        "reference": {"name": "pytorch-fp32", "metrics": dict(result.reference),
                      "size_bytes": result.reference_size},
        "variants": rows,
        "written": list(result.written),
        "rejected": list(result.rejected),
        "skipped": [{"name": n, "reason": why} for n, why in result.skipped],
        "passed": passed,
        "gate_failure": failure,
        "embeddings_dir": emb_dir,
        "seconds": result.seconds,
    }
    write_json(os.path.join(out, "export.json"), summary)
    if not passed:
        log.warning("export: no variant passed its gate; nothing to index or query")
    elif result.rejected:
        log.warning("export: %s failed the gate; the bundle ships %s", ", ".join(result.rejected),
                    ", ".join(result.written))
    return summary


__all__ = ["run", "inputs"]
