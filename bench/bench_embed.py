"""Embedding throughput of torch eager fp32 and every exported variant, in one run.

By default: a ResNet-50 embedder (512-d) at 224x224 with random weights (BatchNorm statistics
measured on real Flowers images so activations have realistic ranges), exported with the same
``export_bundle`` the CLI uses (ONNX Runtime fp32/int8, OpenVINO fp32/fp16/bf16/int8), then each
variant timed the way the SDK runs it (its manifest ``runtime_hints``), at batch 1 and 32,
with images/s and model size as ratios to torch eager fp32. Reference rows: torch eager with
channels_last, ONNX Runtime int8 in the scheme ``auto`` did not pick here (S8S8 on a VNNI CPU,
U8S8 on one without) and OpenVINO int8 from NNCF's defaults
(``nncf.quantize`` + default compile config), the baseline our int8 should beat.

Random weights make the parity (Recall@K) numbers of this run meaningless, so the export runs
with ``allow_drop`` and no accuracy control (ONNX Runtime's or NNCF's); accuracy is measured on a
trained checkpoint: ``--bundle`` times the variants of an existing bundle (e.g. the Flowers or the
EfficientNet-Lite0 export, whose int8 variants keep the layers accuracy control chose in float) instead.

    python bench/bench_embed.py                          # ResNet-50 224², writes bench/out/bench_embed.json
    python bench/bench_embed.py --bundle flowers.ibc     # time an exported bundle's variants
    python bench/bench_embed.py --bundle lite0.ibc       # e.g. EfficientNet-Lite0 at 224² (size from the bundle)
    python bench/bench_embed.py --backbone resnet18 --size 112 --min-time 2   # quick
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT_DIR = ROOT / "bench" / "out"
FLOWERS = ROOT.parent / "shared" / "data" / "flowers102" / "images"
log = logging.getLogger("bench_embed")


def throughput(fn, x: np.ndarray, min_time: float, min_iters: int = 3, warmup: int = 2) -> dict:
    """Images/s from the median time of repeated calls on the same batch."""
    for _ in range(warmup):
        fn(x)
    times = []
    start = time.perf_counter()
    while len(times) < min_iters or time.perf_counter() - start < min_time:
        t = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    return {"images_per_s": len(x) / med, "median_s": med, "iters": len(times)}


def _runner(spec: dict):
    """The callable a timing row measures (built in the child process)."""
    kind = spec["kind"]
    if kind in ("torch", "torch_cl"):
        import torch

        from export.source import load_source

        if spec.get("threads"):
            torch.set_num_threads(int(spec["threads"]))
        emb = load_source(spec["path"]).embedder.eval()
        fmt = torch.channels_last if kind == "torch_cl" else torch.contiguous_format
        emb = emb.to(memory_format=fmt)

        def run(x):
            with torch.no_grad():
                return emb(torch.from_numpy(x).contiguous(memory_format=fmt)).numpy()

        return run
    if kind == "ort":
        from export.runners import onnxruntime_runner

        return onnxruntime_runner(spec["path"])
    from export.runners import openvino_runner

    return openvino_runner(spec["path"], spec.get("hints") or {})


def time_row(spec: dict) -> dict:
    run = _runner(spec)
    x = np.random.default_rng(0).standard_normal((max(spec["batches"]), 3, spec["size"], spec["size"]))
    x = x.astype(np.float32)
    out = {}
    for b in spec["batches"]:
        r = throughput(run, x[:b], spec["min_time"])
        out[f"b{b}"], out[f"iters_b{b}"] = r["images_per_s"], r["iters"]
    return out


def time_in_subprocess(spec: dict) -> dict:
    """Each row in a fresh process: thread pools of one runtime (ORT spinning, TBB, OpenMP) never
    compete with another's, and nothing is warm from an earlier row."""
    proc = subprocess.run([sys.executable, __file__, "--time-row", json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"timing {spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def link_images(dst: Path, classes: list[str], per_class: int) -> Path:
    for c in classes:
        (dst / c).mkdir(parents=True, exist_ok=True)
        for f in sorted((FLOWERS / c).glob("*.jpg"))[:per_class]:
            (dst / c / f.name).symlink_to(f)
    return dst


def random_checkpoint(path: Path, backbone: str, size: int, dim: int, bn_images: int) -> Path:
    import torch

    from models import IBCModel, ModelConfig
    from models.checkpoint import save_checkpoint
    from sdk.preprocess import PreprocessConfig, preprocess_batch

    torch.manual_seed(0)
    cfg = ModelConfig(backbone=backbone, embed_dim=dim, num_classes=51, use_mpn=False)
    model = IBCModel(cfg)
    prep = PreprocessConfig(resize=round(size * 256 / 224), crop=size)
    files = [f for c in sorted(os.listdir(FLOWERS))[:51] for f in sorted((FLOWERS / c).glob("*.jpg"))[:1]][:bn_images]
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average: running stats = statistics of these images
    model.train()
    with torch.no_grad():
        for i in range(0, len(files), 16):
            model(torch.from_numpy(preprocess_batch(files[i:i + 16], prep)), use_mpn=False)
    save_checkpoint(str(path), {"model_config": cfg.to_dict(), "model": model.eval().state_dict(),
                                "config": {"preprocess": prep.to_dict()}})
    return path


def nncf_default_int8(fp32_xml: str, calib_dir: Path, prep, out_xml: str) -> str:
    """OpenVINO int8 the way NNCF's docs show it: nncf.quantize with defaults, no hints."""
    import nncf
    import openvino as ov

    from sdk.preprocess import preprocess_image

    files = sorted(str(p) for p in calib_dir.rglob("*.jpg"))
    ds = nncf.Dataset(files, lambda f: preprocess_image(f, prep)[None])
    q = nncf.quantize(ov.Core().read_model(fp32_xml), ds, subset_size=len(files))
    ov.save_model(q, out_xml, compress_to_fp16=False)
    return out_xml


def prepare(args, work: Path) -> dict:
    """Export (unless --bundle) and list the rows to time; runs in its own process."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("nncf", "export", "sdk", "onnxscript", "onnx_ir", "faiss"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from export.api import export_bundle
    from export.images import PreprocessedImages, folder_set
    from export.openvino_export import OvInt8Options
    from export.ort_quantize import OrtInt8Options, quantize_int8
    from export.source import load_source
    from sdk.bundle import load_manifest

    if args.bundle:
        bundle = Path(args.bundle).resolve()
        manifest = load_manifest(str(bundle))
        ckpt = manifest.provenance["checkpoint"]["path"]
        title = f"bundle {args.bundle}"
    else:
        calib = link_images(work / "calib", sorted(os.listdir(FLOWERS))[:51], max(1, args.calib_images // 51 + 1))
        parity = link_images(work / "parity", sorted(os.listdir(FLOWERS))[51:61], 10)
        ckpt = str(random_checkpoint(work / "random.pt", args.backbone, args.size, args.dim, 64))
        bundle = work / "model.ibc"
        log.info("exporting %s %dx%d (random weights) ...", args.backbone, args.size, args.size)
        export_bundle(ckpt, str(bundle), backends="onnx,openvino", precisions="fp32,fp16,bf16,int8",
                      calib_data=str(calib), parity_data=str(parity), calib_size=args.calib_images, allow_drop=True,
                      tolerance="int8=100,fp16=100,bf16=100,fp32=100", ks=(1,), progress=False,
                      ort_int8=OrtInt8Options(accuracy_control=False),
                      ov_int8=OvInt8Options(accuracy_control=False, float_precision=args.int8_float,
                                            subset_size=args.calib_images))
        manifest = load_manifest(str(bundle))
        title = f"{args.backbone} {args.size}x{args.size}, random weights"

    source = load_source(ckpt)
    torch_bytes = sum(p.numel() * p.element_size() for p in source.embedder.parameters()) + sum(
        b.numel() * b.element_size() for b in source.embedder.buffers())
    specs = [
        ("torch eager fp32", {"kind": "torch", "path": ckpt}, torch_bytes, f"{os.cpu_count()} threads"),
        ("torch eager fp32, 1 thread", {"kind": "torch", "path": ckpt, "threads": 1}, torch_bytes,
         "faster than 2 threads on a busy CPU (OpenMP threads wait on each other)"),
        ("torch eager fp32 channels_last", {"kind": "torch_cl", "path": ckpt}, torch_bytes, ""),
    ]
    for v in manifest.variants:
        if v.backend not in ("onnxruntime", "openvino"):
            continue
        kind = "ort" if v.backend == "onnxruntime" else "ov"
        main_file, nbytes = str(bundle / v.files[0].path), sum(f.bytes for f in v.files)
        specs.append((v.name, {"kind": kind, "path": main_file, "hints": v.runtime_hints}, nbytes,
                      " ".join(f"{k}={val}" for k, val in v.runtime_hints.items())))
        hint = v.runtime_hints.get("INFERENCE_PRECISION_HINT")
        if v.backend == "openvino" and v.precision == "int8" and hint == "f32":
            specs.append((f"{v.name}, float layers in bf16", {"kind": "ov", "path": main_file,
                          "hints": {"INFERENCE_PRECISION_HINT": "bf16"}}, nbytes,
                          "INFERENCE_PRECISION_HINT=bf16 (--ov-int8-float bf16)"))

    if not args.bundle:  # reference rows: the other ORT int8 scheme and NNCF defaults
        other = "s8s8" if OrtInt8Options(accuracy_control=False).scheme == "u8s8" else "u8s8"
        calib_set = PreprocessedImages(folder_set(work / "calib", "calibration", labelled=False).subset(
            args.calib_images), source.preprocess, str(work), progress=False)
        other_onnx = str(work / f"{other}.onnx")
        quantize_int8(str(bundle / "onnx" / "model.fp32.onnx"), other_onnx, calib_set, OrtInt8Options(scheme=other),
                      workdir=str(work), progress=False)
        specs.append((f"onnxruntime-int8 {other.upper()} (reference)", {"kind": "ort", "path": other_onnx},
                      os.path.getsize(other_onnx), ""))
        ref_xml = nncf_default_int8(str(bundle / "openvino" / "fp32" / "model.xml"), work / "calib",
                                    source.preprocess, str(work / "nncf-default.xml"))
        ref_bytes = os.path.getsize(ref_xml) + os.path.getsize(ref_xml[:-4] + ".bin")
        specs.append(("openvino-int8 NNCF defaults (reference)", {"kind": "ov", "path": ref_xml, "hints": {}},
                      ref_bytes, "nncf.quantize() defaults, no hints"))
        specs.append(("openvino-int8 NNCF defaults, f32 hint (reference)",
                      {"kind": "ov", "path": ref_xml, "hints": {"INFERENCE_PRECISION_HINT": "f32"}}, ref_bytes,
                      "INFERENCE_PRECISION_HINT=f32"))
    return {"title": title, "size": source.image_size, "specs": specs,
            "parity": {v.name: v.parity.get("metrics") for v in manifest.variants}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbone", default="resnet50")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--bundle", help="time this existing bundle's variants instead of exporting one")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--min-time", type=float, default=6.0, help="seconds of timed calls per row and batch size")
    ap.add_argument("--calib-images", type=int, default=128)
    ap.add_argument("--int8-float", default="f32", choices=["f32", "bf16"],
                    help="precision of the layers our OpenVINO int8 leaves in float")
    ap.add_argument("--out", default=str(OUT_DIR / "bench_embed.json"))
    ap.add_argument("--time-row", help=argparse.SUPPRESS)  # internal: time one row in this (child) process
    ap.add_argument("--prepare", help=argparse.SUPPRESS)  # internal: export + row list, written to this file
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.time_row:
        print(json.dumps(time_row(json.loads(args.time_row))))
        return 0
    if args.prepare:
        with open(args.prepare, "w") as f:
            json.dump(prepare(args, Path(args.work)), f)
        return 0

    # The parent only orchestrates: it loads no runtime, so no idle thread pool competes with a timing.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    batches = [int(b) for b in args.batches.split(",")]
    work = Path(tempfile.mkdtemp(prefix="bench-embed-"))
    t_all = time.time()
    load_before = os.getloadavg()
    plan_file = work / "plan.json"
    child = [sys.executable, __file__, "--prepare", str(plan_file), "--work", str(work)] + [
        a for a in (argv if argv is not None else sys.argv[1:])]
    if subprocess.run(child).returncode != 0:
        raise SystemExit("bench_embed: the export / preparation step failed (see above)")
    plan = json.loads(plan_file.read_text())
    rows: list[dict] = []
    try:
        for name, spec, nbytes, note in plan["specs"]:
            spec.update(batches=batches, min_time=args.min_time, size=plan["size"])
            row = {"name": name, "bytes": int(nbytes), "note": note, **time_in_subprocess(spec)}
            log.info("%-48s %s", name, "  ".join(f"b{b} {row[f'b{b}']:7.1f} img/s" for b in batches))
            rows.append(row)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    # the baseline is the faster torch eager fp32 row (2 threads or 1) at each batch size: on a busy machine
    # 2 OpenMP threads can be 10x slower than 1, and a ratio against that would flatter every variant
    eager = [r for r in rows if r["name"] in ("torch eager fp32", "torch eager fp32, 1 thread")]
    base = {b: max(r[f"b{b}"] for r in eager) for b in batches}
    for r in rows:
        for b in batches:
            r[f"x_b{b}"] = r[f"b{b}"] / base[b]
        r["x_size"] = r["bytes"] / rows[0]["bytes"]
    result = {
        "title": plan["title"], "batches": batches, "min_time_s": args.min_time, "rows": rows,
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "seconds": round(time.time() - t_all),
        "parity": plan["parity"], "baseline_images_per_s": base,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(markdown(result))
    print(f"\nwrote {args.out} ({result['seconds']} s; load average before {load_before[0]:.2f}, "
          f"after {result['loadavg_after'][0]:.2f})")
    return 0


def markdown(result: dict) -> str:
    bs = result["batches"]
    head = "| variant | " + " | ".join(f"img/s b{b} | × b{b}" for b in bs) + " | MB | × size | notes |"
    sep = "|---|" + "---:|---:|" * len(bs) + "---:|---:|---|"
    lines = [f"**{result['title']}** (× = ratio to the faster torch eager fp32 row at that batch size)", "",
             head, sep]
    for r in result["rows"]:
        cells = " | ".join(f"{r[f'b{b}']:.1f} | {r[f'x_b{b}']:.2f}" for b in bs)
        lines.append(f"| {r['name']} | {cells} | {r['bytes'] / 1e6:.1f} | {r['x_size']:.2f} | {r['note']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
