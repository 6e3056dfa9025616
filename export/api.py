"""``export_bundle``: checkpoint -> verified variants -> one atomically written bundle.

The flow (the CLI is a thin layer over it):

1. refuse early what cannot work: an existing output (unless ``overwrite``), unknown or
   uninstalled backends, a bad checkpoint, empty or unreadable image sets;
2. PyTorch fp32 reference embeddings and Recall@K / MAP@R on the held-out parity set;
3. fp32 ONNX (dynamic batch, opset >= 17, full ``onnx.checker``), then ONNX Runtime vs PyTorch on
   real images: a numeric mismatch stops the export;
4. each requested variant is built into a temporary sibling of the output directory and measured
   on the parity set; one whose Recall@1 drop exceeds its tolerance is left out (unless
   ``allow_drop``) and reported by :class:`GateFailure`;
5. the manifest is written and read back through the SDK's reader, then the directory is renamed
   into place. Any failure before that leaves the previous bundle (or nothing) behind.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np

from export.bundle_writer import BuiltVariant, build_manifest, variant_bytes
from export.errors import BackendUnavailable, DataSetError, ExportError, GateFailure
from export.images import ImageSet, PreprocessedImages, checkpoint_set, folder_set
from export.onnx_export import DEFAULT_OPSET, check_numerics, export_onnx
from export.ort_quantize import OrtInt8Options
from export.openvino_export import OvInt8Options
from export.parity import compare, parse_tolerance, retrieval_metrics
from export.runners import TorchRunner, embed, onnxruntime_runner, openvino_runner, tensorrt_runner
from export.source import ExportSource, load_source
from sdk.backends import BACKEND_ALIASES, runtime_hints
from sdk.bundle import PRECISIONS, Manifest, atomic_directory, load_manifest, write_manifest
from sdk.datasets import default_ks

log = logging.getLogger(__name__)

SUPPORTED = {"onnxruntime": ("fp32", "int8"), "openvino": ("fp32", "fp16", "bf16", "int8"),
             "tensorrt": ("fp16", "int8")}
UNSUPPORTED_WHY = {
    ("onnxruntime", "fp16"): "ONNX Runtime's CPU provider has no fast fp16 kernels; use openvino or tensorrt fp16",
    ("onnxruntime", "bf16"): "not produced for ONNX Runtime",
    ("tensorrt", "fp32"): "TensorRT variants are fp16 / int8 (use onnxruntime fp32 for an fp32 reference)",
    ("tensorrt", "bf16"): "not produced for TensorRT",
}
PRECISION_ORDER = PRECISIONS  # the bundle format's precisions, in build order
DEFAULT_KS = default_ks("folder")
NUMERIC_CHECK_IMAGES = 32


@dataclass
class ExportResult:
    """What was built, measured and written (``out`` is None when nothing was written)."""

    out: str | None
    reference: dict
    variants: list[BuiltVariant]
    written: list[str]
    rejected: list[str]
    skipped: list[tuple[str, str]]
    manifest: Manifest | None
    ks: tuple[int, ...]
    sizes: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    reference_size: int = 0

    @property
    def failed(self) -> list[BuiltVariant]:
        return [v for v in self.variants if not v.parity.passed]


def _as_list(spec) -> list[str]:
    if spec is None:
        return []
    if isinstance(spec, str):
        spec = spec.split(",")
    return [s.strip().lower() for s in spec if s and s.strip()]


def _require_modules(backend: str, names: tuple[str, ...]) -> None:
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise BackendUnavailable(f"backend {backend!r} is not available here: Python package {name!r} "
                                     f"is not installed ({e})") from None


def resolve_plan(backends, precisions) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(backend, precision) pairs to build, in order, and the requested pairs skipped (with why)."""
    bs, ps = _as_list(backends), _as_list(precisions)
    if not bs:
        raise ExportError("no backend requested")
    if not ps:
        raise ExportError("no precision requested")
    canon = []
    for b in bs:
        if b not in BACKEND_ALIASES:
            raise ExportError(f"unknown backend {b!r}; choose from onnx, openvino, tensorrt")
        if BACKEND_ALIASES[b] not in canon:
            canon.append(BACKEND_ALIASES[b])
    for p in ps:
        if p not in PRECISION_ORDER:
            raise ExportError(f"unknown precision {p!r}; choose from {', '.join(PRECISION_ORDER)}")
    plan, skipped = [], []
    for b in canon:
        for p in PRECISION_ORDER:
            if p not in ps:
                continue
            if p in SUPPORTED[b]:
                plan.append((b, p))
            else:
                skipped.append((f"{b}-{p}", UNSUPPORTED_WHY.get((b, p), "not supported")))
    if not plan:
        raise ExportError("no variant to build: " + "; ".join(f"{n}: {why}" for n, why in skipped))
    for b in canon:
        _require_modules(b, ("onnx", "onnxruntime"))  # every variant starts from the checked ONNX
        if b == "openvino":
            _require_modules(b, ("openvino",) + (("nncf",) if ("openvino", "int8") in plan else ()))
        if b == "tensorrt":
            from export.tensorrt_export import require_tensorrt

            require_tensorrt()
    return plan, skipped


def gate_ks(config: dict) -> tuple[int, ...]:
    """The Recall@K cut-offs training reported for the checkpoint's dataset (SOP: 1, 10, 100, 1000, ...)."""
    data = config.get("data") if isinstance(config, dict) else None
    return default_ks(str(data.get("dataset", "folder"))) if isinstance(data, dict) else DEFAULT_KS


def _sets(source: ExportSource, plan, *, calib_data, parity_data, val_data, calib_size, parity_limit, val_limit,
          seed, need_val) -> tuple[ImageSet, ImageSet | None, ImageSet | None, str]:
    data = source.data_config
    if parity_data:
        parity = folder_set(parity_data, "parity")
    elif data:
        try:
            parity = checkpoint_set(data, "test", "parity")
        except DataSetError:
            log.warning("the checkpoint's test split is unusable; using its validation split for parity")
            parity = checkpoint_set(data, "val", "parity")
    else:
        raise DataSetError("no parity images: the checkpoint names no dataset; pass --parity-data DIR "
                           "(DIR/<class>/<image>, held-out classes)")
    parity.require_labels()
    parity = parity.subset(parity_limit, seed)
    parity.require_labels()

    calib = None
    if any(p == "int8" for _, p in plan):
        if calib_data:
            calib = folder_set(calib_data, "calibration", labelled=False)
        elif data:
            calib = checkpoint_set(data, "train", "calibration")
        else:
            raise DataSetError("int8 needs calibration images: the checkpoint names no dataset; pass --calib-data DIR "
                               "(training images)")
        calib = calib.subset(calib_size, seed)

    val, val_note = None, ""
    if need_val:
        if val_data:
            val = folder_set(val_data, "validation")
        elif data:
            try:
                val = checkpoint_set(data, "val", "validation")
            except DataSetError as e:
                log.info("no validation split in the checkpoint's dataset (%s)", e)
            if val is None:
                log.warning("the checkpoint's dataset has no validation split: int8 accuracy control tunes "
                            "on training-class images (the parity gate stays on the held-out classes)")
                val = checkpoint_set(data, "train", "validation")
                val_note = "no validation split: accuracy control used training-class images"
        if val is None:
            log.warning("no separate validation split (pass --val-data): int8 accuracy control tunes on the "
                        "parity set itself, so its parity numbers are optimistic")
            val = parity
            val_note = "accuracy control tuned on the parity set (no separate validation split)"
        if calib is not None and val is not parity:  # validation images must not be calibration images
            val = val.without(calib.paths, "calibration images")
        val.require_labels()
        val = val.subset(val_limit, seed + 1)
    return parity, calib, val, val_note


def _remove_unreferenced(bundle_dir: str, keep: list[BuiltVariant], drop: list[BuiltVariant]) -> None:
    kept = {f for v in keep for f in v.files}
    for v in drop:
        for f in v.files:
            if f not in kept:
                path = os.path.join(bundle_dir, *f.split("/"))
                if os.path.exists(path):
                    os.unlink(path)
    for root, dirs, files in os.walk(bundle_dir, topdown=False):
        if root != bundle_dir and not os.listdir(root):
            os.rmdir(root)


class _Builder:
    """Builds one variant's files inside the temporary bundle directory and measures it."""

    def __init__(self, source, bundle_dir, work, fp32_onnx, calib, val, ort_int8, ov_int8, trt_weak_typing,
                 progress):
        self.source, self.dir, self.work, self.fp32_onnx = source, bundle_dir, work, fp32_onnx
        self.calib, self.val, self.ort_int8, self.ov_int8 = calib, val, ort_int8, ov_int8
        self.trt_weak_typing, self.progress = trt_weak_typing, progress
        self._ov_fp32_files: list[str] | None = None

    def _path(self, rel: str) -> str:
        full = os.path.join(self.dir, *rel.split("/"))
        os.makedirs(os.path.dirname(full), exist_ok=True)
        return full

    def build(self, backend: str, precision: str) -> BuiltVariant:
        name = f"{backend}-{precision}"
        return getattr(self, f"_{backend}")(name, precision)

    def runner(self, v: BuiltVariant):
        main = os.path.join(self.dir, *v.files[0].split("/"))
        if v.backend == "onnxruntime":
            return onnxruntime_runner(main)
        if v.backend == "openvino":
            return openvino_runner(main, v.runtime_hints, precision=v.precision)
        return tensorrt_runner(main, v.runtime_hints, precision=v.precision)

    def _onnxruntime(self, name, precision) -> BuiltVariant:
        if precision == "fp32":
            rel = "onnx/model.fp32.onnx"
            shutil.copyfile(self.fp32_onnx, self._path(rel))
            return BuiltVariant(name, "onnxruntime", precision, [rel], notes="fp32 ONNX (dynamic batch)")
        from export.ort_accuracy_control import describe, quantize_int8_with_accuracy_control
        from export.ort_quantize import quantize_int8

        rel = "onnx/model.int8.onnx"
        o = self.ort_int8
        if o.accuracy_control:
            summary = quantize_int8_with_accuracy_control(self.fp32_onnx, self._path(rel), self.calib, self.val, o,
                                                          workdir=self.work, progress=self.progress)
        else:
            summary = quantize_int8(self.fp32_onnx, self._path(rel), self.calib, o, workdir=self.work,
                                    progress=self.progress)
        chosen = f" (auto: {o.scheme_chosen_for})" if o.scheme_chosen_for else ""
        notes = (f"static QDQ int8, {o.scheme.upper()}{chosen} "
                 f"({'per-channel' if o.per_channel else 'per-tensor'} weights), "
                 f"{o.calibrate_method} calibration on {len(self.calib)} training images"
                 + (f"; kept float: {', '.join(o.keep_float)}" if o.keep_float else "")
                 + (f"; {describe(summary['accuracy_control'])}" if "accuracy_control" in summary else ""))
        return BuiltVariant(name, "onnxruntime", precision, [rel], notes=notes, build={"quantization": summary})

    def _openvino(self, name, precision) -> BuiltVariant:
        from export import openvino_export as ovx

        if precision in ("fp32", "bf16"):
            if self._ov_fp32_files is None:
                self._ov_fp32_files = ovx.save_ir(ovx.convert(self.fp32_onnx), self.dir, "openvino/fp32", False)
            hints = ovx.runtime_hints(precision)
            notes = ("fp32 IR, runs in f32 (INFERENCE_PRECISION_HINT=f32; without it OpenVINO may run bf16)"
                     if precision == "fp32" else
                     "fp32 IR run in bf16 (INFERENCE_PRECISION_HINT=bf16; needs AVX-512-bf16/AMX to be fast)")
            return BuiltVariant(name, "openvino", precision, list(self._ov_fp32_files), hints, notes)
        if precision == "fp16":
            files = ovx.save_ir(ovx.convert(self.fp32_onnx), self.dir, "openvino/fp16", True)
            return BuiltVariant(name, "openvino", precision, files, ovx.runtime_hints("fp16"),
                                "fp16 weights, computes in f16 (INFERENCE_PRECISION_HINT=f16; where the device "
                                "has no f16 arithmetic OpenVINO falls back to f32)")
        quantized, summary = ovx.quantize_int8(ovx.convert(self.fp32_onnx), self.calib, self.val, self.ov_int8)
        files = ovx.save_ir(quantized, self.dir, "openvino/int8", False)
        o = self.ov_int8
        notes = (f"NNCF int8 ({o.preset} preset, {summary['calibration_images']} calibration images"
                 + (f", accuracy control: Recall@1 drop <= {o.max_drop:g} points on {summary.get('validation_images')}"
                    f" validation images" if o.accuracy_control else "")
                 + f"); layers left in float run in {o.float_precision}")
        return BuiltVariant(name, "openvino", precision, files, ovx.runtime_hints("int8", o.float_precision), notes,
                            build={"quantization": summary})

    def _tensorrt(self, name, precision) -> BuiltVariant:
        from export import tensorrt_export as trx

        if precision == "int8":
            src = os.path.join(self.work, "model.qdq.onnx")
            summary = trx.qdq_onnx(self.fp32_onnx, src, self.calib, keep_float=self.ort_int8.keep_float,
                                   workdir=self.work, progress=self.progress)
        else:
            src, summary = self.fp32_onnx, {}
            if not self.trt_weak_typing:
                src = trx.fp16_onnx(self.fp32_onnx, os.path.join(self.work, "model.fp16.onnx"))
        rel = f"tensorrt/model.{precision}.plan"
        info = trx.build_engine(src, self._path(rel), precision, weak_typing=self.trt_weak_typing)
        notes = (f"TensorRT {info['tensorrt']} engine for {info['gpu']} only (engines are specific to the GPU model "
                 f"and TensorRT version). {trx.CI_NOTE}")
        hints = runtime_hints("tensorrt", precision, max_batch=info["max_batch"])
        if self.trt_weak_typing:
            hints["weak_typing"] = True
        return BuiltVariant(name, "tensorrt", precision, [rel], hints, notes,
                            build={"engine": info, "quantization": summary})


def _measure(builder: _Builder, v: BuiltVariant, parity: PreprocessedImages, reference: np.ndarray,
             ref_metrics: dict, ks, tolerance: float, batch_size: int, progress: bool) -> np.ndarray:
    runner = builder.runner(v)
    t0 = time.perf_counter()
    emb = embed(runner, parity, batch_size, f"parity {v.name}", progress)
    dt = time.perf_counter() - t0
    v.images_per_s = len(parity) / dt if dt > 0 else None
    v.parity = compare(v.name, v.precision, emb, reference, parity.labels, ref_metrics, ks, tolerance)
    q = v.build.get("quantization") or {}
    if v.precision == "int8" and (q.get("fake_quantize_nodes") == 0 or q.get("quantize_linear_nodes") == 0):
        v.parity.passed = False  # e.g. accuracy control reverted every layer: a float model is not an int8 variant
        v.parity.reason = "no quantized layer left (accuracy control reverted them all?): not an int8 model"
    log.info("%s %s", "PASS" if v.parity.passed else "FAIL", v.parity.describe())
    return emb


def _keep_embeddings(directory: str | None, name: str, emb: np.ndarray) -> None:
    """Save one variant's parity embeddings (``name.npy``) so a report can recompute any number from them."""
    if directory:
        os.makedirs(directory, exist_ok=True)
        np.save(os.path.join(directory, f"{name}.npy"), np.asarray(emb, np.float32))


def export_bundle(
    checkpoint: str,
    out: str,
    *,
    backends=("onnx", "openvino"),
    precisions=("fp32", "fp16", "int8"),
    calib_data: str | None = None,
    parity_data: str | None = None,
    val_data: str | None = None,
    data_root: str | None = None,
    tolerance=None,
    ks=None,
    allow_drop: bool = False,
    overwrite: bool = False,
    calib_size: int = 300,
    parity_limit: int | None = None,
    val_limit: int | None = 1000,
    batch_size: int = 32,
    ort_int8: OrtInt8Options | None = None,
    ov_int8: OvInt8Options | None = None,
    opset: int = DEFAULT_OPSET,
    exporter: str = "dynamo",
    numeric_max_abs_diff: float = 1e-3,
    numeric_min_cosine: float = 0.9999,
    trt_weak_typing: bool = False,
    seed: int = 0,
    progress: bool = True,
    workdir: str | None = None,
    embeddings_dir: str | None = None,
) -> ExportResult:
    """Export ``checkpoint`` to a bundle directory ``out``; see the module docstring for the steps.

    ``tolerance``: Recall@1 drop allowed, in points: a number (int8), ``"int8=0.5,fp16=0.1"`` or a
    dict; defaults int8 0.5, fp16 0.1, bf16 0.5, fp32 0.1. Raises :class:`GateFailure` (after
    writing the passing variants, or writing nothing if none passed) when a variant fails the gate
    and ``allow_drop`` is off; other :class:`ExportError` subclasses for bad input.
    ``embeddings_dir``: also save the parity set's embeddings there (``pytorch-fp32.npy``, one
    ``<variant>.npy`` each, ``parity.json`` with the image paths and labels), written or not.
    """
    t_start = time.time()
    out = os.path.abspath(os.fspath(out))
    if os.path.exists(out) and not overwrite:
        raise ExportError(f"{out} already exists; pass --overwrite to replace it")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ExportError(f"{out} exists and is not a bundle directory; refusing to replace it")
    try:  # cheap checks first: resolving the plan imports the quantizers
        tolerances = parse_tolerance(tolerance)
    except ValueError as e:
        raise ExportError(str(e)) from None
    plan, skipped = resolve_plan(backends, precisions)
    for name, why in skipped:
        log.info("skipping %s: %s", name, why)
    ort_int8 = ort_int8 or OrtInt8Options()
    ov_int8 = ov_int8 or OvInt8Options()
    source = load_source(checkpoint, data_root=data_root)
    ks = tuple(int(k) for k in (ks or gate_ks(source.config)))
    need_val = (("openvino", "int8") in plan and ov_int8.accuracy_control) or (
        ("onnxruntime", "int8") in plan and ort_int8.accuracy_control)

    with tempfile.TemporaryDirectory(prefix="ibc-export-", dir=workdir) as work:
        parity_set, calib_set, val_set, val_note = _sets(
            source, plan, calib_data=calib_data, parity_data=parity_data, val_data=val_data, calib_size=calib_size,
            parity_limit=parity_limit, val_limit=val_limit, seed=seed, need_val=need_val)
        prep = source.preprocess
        parity = PreprocessedImages(parity_set, prep, work, progress)
        calib = PreprocessedImages(calib_set, prep, work, progress) if calib_set is not None else None
        val = None
        if val_set is not None:
            val = parity if val_set is parity_set else PreprocessedImages(val_set, prep, work, progress)
        too_big = [k for k in ks if k >= len(parity)]
        if too_big:
            log.warning("dropping Recall@K for K=%s: the parity set has only %d images", too_big, len(parity))
            ks = tuple(k for k in ks if k < len(parity)) or (1,)
        if 1 not in ks:
            ks = (1,) + ks

        reference = embed(TorchRunner(source.embedder), parity, batch_size, "parity pytorch-fp32", progress)
        ref_metrics = retrieval_metrics(reference, parity.labels, ks)
        if embeddings_dir:
            _keep_embeddings(embeddings_dir, "pytorch-fp32", reference)
            with open(os.path.join(embeddings_dir, "parity.json"), "w") as f:
                json.dump({"paths": list(parity_set.paths), "labels": [int(y) for y in parity.labels]}, f)
        log.info("reference pytorch-fp32 on %d parity images: %s", len(parity),
                 ", ".join(f"{k} {100 * v:.2f}" for k, v in ref_metrics.items()))

        fp32_onnx = export_onnx(source.embedder, os.path.join(work, "model.fp32.onnx"), source.image_size,
                                source.embedding_dim, opset=opset, exporter=exporter)
        n_check = min(NUMERIC_CHECK_IMAGES, len(parity))
        numeric = check_numerics(fp32_onnx, reference[:n_check], parity.first(n_check), numeric_max_abs_diff,
                                 numeric_min_cosine)

        with atomic_directory(out, overwrite=overwrite) as tmp:
            builder = _Builder(source, tmp, work, fp32_onnx, calib, val, ort_int8, ov_int8, trt_weak_typing, progress)
            built: list[BuiltVariant] = []
            for backend, precision in plan:
                t0 = time.time()
                v = builder.build(backend, precision)
                v.build["build_seconds"] = round(time.time() - t0, 1)
                emb = _measure(builder, v, parity, reference, ref_metrics, ks, tolerances[precision], batch_size,
                               progress)
                _keep_embeddings(embeddings_dir, v.name, emb)
                built.append(v)
            passed = {v.name: v.parity.passed for v in built}
            keep = [v for v in built if passed[v.name] or allow_drop]
            rejected = [v for v in built if v not in keep]
            sizes = {v.name: variant_bytes(tmp, v.files) for v in built}
            _remove_unreferenced(tmp, keep, rejected)
            result = ExportResult(out=None, reference=ref_metrics, variants=built, written=[v.name for v in keep],
                                  rejected=[v.name for v in rejected], skipped=skipped, manifest=None, ks=ks,
                                  sizes=sizes, reference_size=os.path.getsize(fp32_onnx))
            if not keep:
                raise GateFailure(_gate_message(rejected, written=False), rejected, result)
            parity_info = {
                "dataset": parity_set.describe(),
                "ks": list(ks),
                "gate": "Recall@1 drop (points) vs the PyTorch fp32 reference <= tolerance of the variant's precision",
                "tolerances": tolerances,
                "allow_drop": allow_drop,
                "reference": {"name": "pytorch-fp32", "metrics": ref_metrics},
                "onnx_vs_pytorch": numeric,
                "validation_set": ({**val_set.describe(), "note": val_note} if val_set is not None else None),
                "rejected": [{"name": v.name, "backend": v.backend, "precision": v.precision, **v.parity.to_dict()}
                             for v in rejected],
                "skipped": [{"name": n, "reason": why} for n, why in skipped],
            }
            from export.tensorrt_export import CI_NOTE

            extra = {"calibration": calib_set.describe() if calib_set is not None else None,
                     "onnx_export": {"opset": opset, "exporter": exporter},
                     "tensorrt": CI_NOTE}
            manifest = build_manifest(tmp, source=source, variants=keep, passed=passed, allow_drop=allow_drop,
                                      parity_info=parity_info, provenance_extra=extra)
            write_manifest(tmp, manifest)
            load_manifest(tmp, verify=True)  # the SDK's own reader must accept what we wrote
        result.out = out
        result.manifest = manifest
        result.seconds = round(time.time() - t_start, 1)
        for p in (parity, calib, val):
            if p is not None:
                p.close()
    log.info("wrote %s: %s", out, ", ".join(result.written))
    if rejected and not allow_drop:
        raise GateFailure(_gate_message(rejected, written=True), rejected, result)
    return result


def _gate_message(rejected: list[BuiltVariant], written: bool) -> str:
    lines = [v.parity.describe() + (f" ({v.parity.reason})" if v.parity.reason else "") for v in rejected]
    tail = ("left out of the bundle (pass --allow-drop to keep it)" if written
            else "no variant passed, nothing was written")
    return f"parity gate failed for {', '.join(v.name for v in rejected)}: " + "; ".join(lines) + f"; {tail}"
