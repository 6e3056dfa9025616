"""Which int8 recipe keeps Recall@1? A study on a trained checkpoint (ONNX Runtime and OpenVINO).

For each recipe: Recall@1 drop on the held-out test classes (the parity gate's set), the drop
on the accuracy-control validation images, mean cosine to the fp32 reference, and throughput at
batch 32. This is how the exporter's int8 defaults were chosen; see bench/RESULTS.md.

    python bench/int8_recipes.py runs/flowers-mpn-s0/best.pt            # writes bench/out/int8_recipes.json
    python bench/int8_recipes.py CKPT --quick                             # fewer recipes, smaller sets
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
log = logging.getLogger("int8_recipes")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--calib-size", type=int, default=300)
    ap.add_argument("--val-limit", type=int, default=1000)
    ap.add_argument("--parity-limit", type=int, default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only-ov", action="store_true", help="skip the ONNX Runtime recipes")
    ap.add_argument("--ov-recipes", help="JSON list of OvInt8Options overrides to try instead of the built-in list")
    ap.add_argument("--no-ac", action="store_true", help="skip the accuracy-control runs")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "int8_recipes.json"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for noisy in ("nncf", "export", "sdk"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from bench_embed import throughput
    from export import openvino_export as ovx
    from export.images import PreprocessedImages, checkpoint_set
    from export.onnx_export import export_onnx
    from export.ort_quantize import OrtInt8Options, quantize_int8
    from export.parity import retrieval_metrics
    from export.runners import TorchRunner, embed, onnxruntime_runner, openvino_runner
    from export.source import load_source

    src = load_source(args.checkpoint)
    data = src.data_config
    work = tempfile.mkdtemp(prefix="int8-recipes-")
    parity = PreprocessedImages(checkpoint_set(data, "test", "parity").subset(args.parity_limit), src.preprocess, work)
    try:
        val_set = checkpoint_set(data, "val", "validation")
    except Exception:  # noqa: BLE001 - no validation split: training classes, as the exporter does
        val_set = checkpoint_set(data, "train", "validation")
    val = PreprocessedImages(val_set.subset(args.val_limit, seed=1), src.preprocess, work)
    calib = PreprocessedImages(checkpoint_set(data, "train", "calibration").subset(args.calib_size), src.preprocess, work)
    ks = (1,)
    torch_runner = TorchRunner(src.embedder)
    ref = embed(torch_runner, parity, 64, "reference")
    ref_val = embed(torch_runner, val, 64, "reference val")
    ref_m = retrieval_metrics(ref, parity.labels, ks)["recall@1"]
    ref_v = retrieval_metrics(ref_val, val.labels, ks)["recall@1"]
    fp32 = export_onnx(src.embedder, os.path.join(work, "fp32.onnx"), src.image_size, src.embedding_dim)
    x32 = parity.first(32)
    rows = []

    def measure(name, runner, extra):
        t = time.time()
        emb = embed(runner, parity, 64, name)
        emb_v = embed(runner, val, 64, name + " val")
        r1 = retrieval_metrics(emb, parity.labels, ks)["recall@1"]
        r1v = retrieval_metrics(emb_v, val.labels, ks)["recall@1"]
        row = {"recipe": name, "test_drop": round(100 * (ref_m - r1), 3), "val_drop": round(100 * (ref_v - r1v), 3),
               "cosine_mean": float((emb * ref).sum(1).mean()), "cosine_p1": float(np.percentile((emb * ref).sum(1), 1)),
               "b32": throughput(runner, x32, 3.0)["images_per_s"], **extra, "seconds": round(time.time() - t)}
        rows.append(row)
        log.info("%-52s test drop %+.2f  val drop %+.2f  cos %.4f  %.0f img/s", name, row["test_drop"], row["val_drop"],
                 row["cosine_mean"], row["b32"])

    measure("openvino fp32 (f32)", openvino_runner(ovx.convert(fp32), {"INFERENCE_PRECISION_HINT": "f32"}), {})
    measure("openvino fp32 IR in bf16", openvino_runner(ovx.convert(fp32), {"INFERENCE_PRECISION_HINT": "bf16"}), {})

    ort_recipes = [("minmax", ()), ("minmax", ("head",)), ("entropy", ()), ("percentile", ())]
    if args.quick:
        ort_recipes = ort_recipes[:2]
    if args.only_ov:
        ort_recipes = []
    for method, keep in ort_recipes:
        out = os.path.join(work, f"ort-{method}-{len(keep)}.onnx")
        opts = OrtInt8Options(calibrate_method=method, keep_float=keep)
        quantize_int8(fp32, out, calib, opts, workdir=work)
        measure(f"onnxruntime u8s8 {method}{' head-float' if keep else ''}", onnxruntime_runner(out), {})

    ov_recipes = [
        dict(preset="performance", fast_bias_correction=True, keep_float=()),  # NNCF's defaults
        dict(preset="performance", fast_bias_correction=True, keep_float=("head",)),
        dict(preset="mixed", fast_bias_correction=True, keep_float=()),
        dict(preset="performance", fast_bias_correction=False, keep_float=()),
        dict(preset="mixed", fast_bias_correction=False, keep_float=("head",)),
    ]
    if args.quick:
        ov_recipes = ov_recipes[:2]
    if args.ov_recipes:
        ov_recipes = json.loads(args.ov_recipes)
    for r in ov_recipes:
        opts = ovx.OvInt8Options(accuracy_control=False, subset_size=args.calib_size, **r)
        q, summary = ovx.quantize_int8(ovx.convert(fp32), calib, None, opts)
        label = "openvino " + " ".join(f"{k}={v}" for k, v in r.items())
        for hint in ("f32", "bf16"):
            measure(f"{label} rest-{hint}", openvino_runner(q, {"INFERENCE_PRECISION_HINT": hint}),
                    {"fake_quantize": summary["fake_quantize_nodes"]})

    for max_drop in (() if args.no_ac else (0.3,)):
        opts = ovx.OvInt8Options(accuracy_control=True, max_drop=max_drop, subset_size=args.calib_size)
        q, summary = ovx.quantize_int8(ovx.convert(fp32), calib, val, opts)
        for hint in ("f32", "bf16"):
            measure(f"openvino performance fastBC + accuracy control {max_drop} rest-{hint}",
                    openvino_runner(q, {"INFERENCE_PRECISION_HINT": hint}),
                    {"fake_quantize": summary["fake_quantize_nodes"], "ac_log": summary["accuracy_control_log"][-1:]})

    shutil.rmtree(work, ignore_errors=True)
    result = {"checkpoint": args.checkpoint, "reference_r1_test": ref_m, "reference_r1_val": ref_v,
              "parity_images": len(parity), "val_images": len(val), "val_origin": val_set.origin,
              "calibration_images": len(calib), "rows": rows, "loadavg": os.getloadavg()}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"reference R@1 test {100 * ref_m:.2f} ({len(parity)} images), val {100 * ref_v:.2f} ({len(val)} images)")
    print("| recipe | test ΔR@1 | val ΔR@1 | cos mean | cos p1 | img/s b32 |\n|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['recipe']} | {r['test_drop']:+.2f} | {r['val_drop']:+.2f} | {r['cosine_mean']:.4f} | "
              f"{r['cosine_p1']:.4f} | {r['b32']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
