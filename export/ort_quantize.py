"""ONNX Runtime static int8 quantization (QDQ format) of the fp32 ONNX embedder.

Why these defaults: per-channel int8 weights keep ResNet accuracy; unsigned activations with
signed weights (U8S8) ran about 3x faster than S8S8 on the x86 CPUs measured here (VNNI, so no
saturation issue and no ``reduce_range``); ``quant_pre_process`` runs with symbolic shape
inference skipped, because it fails on graphs from torch's dynamo exporter. Calibration reads
one batch at a time (``CalibStridedMinMax``), so memory stays bounded even for histogram
methods on ResNet-50. The symmetric S8S8 scheme is the one TensorRT's explicit quantization
wants (see :mod:`export.tensorrt_export`).
"""

from __future__ import annotations

import fnmatch
import logging
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader
from tqdm.auto import tqdm

from export.errors import ExportError

log = logging.getLogger(__name__)

CALIBRATION_METHODS = ("minmax", "entropy", "percentile", "distribution")
SCHEMES = {  # name: (activation type, weight type, symmetric activations)
    "u8s8": ("QUInt8", "QInt8", False),
    "s8s8": ("QInt8", "QInt8", False),
    "s8s8-symmetric": ("QInt8", "QInt8", True),  # zero points 0: TensorRT's explicit quantization
}
HEAD_OP_TYPES = ("Gemm", "MatMul")  # the only dense layers of an embedder: the embedding head


@dataclass
class OrtInt8Options:
    """Settings of :func:`quantize_int8` (recorded in the manifest)."""

    scheme: str = "u8s8"
    calibrate_method: str = "minmax"
    per_channel: bool = True
    reduce_range: bool = False  # 7-bit weights: only for CPUs without VNNI
    # node names / globs, or "head": the embedding head (a float Gemm costs ~nothing and raised the mean cosine
    # to fp32 from 0.993 to 0.996 on a trained Flowers ResNet-18, see bench/RESULTS.md)
    keep_float: tuple[str, ...] = ("head",)
    percentile: float = 99.999  # for calibrate_method="percentile"
    quantize_bias: bool = True  # int32 biases; off for TensorRT, which keeps biases float and fuses them
    batch_size: int = 8

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise ExportError(f"unknown ONNX Runtime int8 scheme {self.scheme!r}; choose from {sorted(SCHEMES)}")
        if self.calibrate_method not in CALIBRATION_METHODS:
            raise ExportError(f"unknown calibration method {self.calibrate_method!r}; "
                              f"choose from {CALIBRATION_METHODS}")
        self.keep_float = tuple(self.keep_float)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["keep_float"] = list(self.keep_float)
        return d


def resolve_nodes(model: onnx.ModelProto, patterns: tuple[str, ...] | list[str]) -> list[str]:
    """Node names matching ``patterns`` (exact names, globs, or the alias ``head``); unknown ones are an error."""
    names = [n.name for n in model.graph.node]
    chosen: list[str] = []
    for pat in patterns:
        if pat == "head":
            hits = [n.name for n in model.graph.node if n.op_type in HEAD_OP_TYPES]
        else:
            hits = [n for n in names if n == pat or fnmatch.fnmatchcase(n, pat)]
        if not hits:
            raise ExportError(f"--keep-float {pat!r} matches no node of the ONNX graph (names look like "
                              f"{', '.join(names[:3])}, ...; or use 'head')")
        chosen.extend(h for h in hits if h not in chosen)
    return chosen


class ImageCalibrationReader(CalibrationDataReader):
    """Calibration data over preprocessed images: one dict per batch, range-selectable."""

    def __init__(self, images, input_name: str, batch_size: int = 8, progress: bool = True):
        self.images = images
        self.input_name = input_name
        self.batch_size = batch_size
        self.starts = list(range(0, len(images), batch_size))
        self._range = (0, len(self.starts))
        self._pos = 0
        self.bar = tqdm(total=len(images), desc="calibrate onnxruntime int8", unit="img", disable=not progress,
                        leave=False)

    def __len__(self) -> int:
        return len(self.starts)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._range = (start_index, end_index)
        self._pos = start_index

    def get_next(self) -> dict | None:
        if self._pos >= min(self._range[1], len(self.starts)):
            return None
        start = self.starts[self._pos]
        self._pos += 1
        batch = np.ascontiguousarray(self.images.array[start:start + self.batch_size])
        self.bar.update(len(batch))
        return {self.input_name: batch}

    def close(self) -> None:
        self.bar.close()


def pre_process(fp32_path: str, out_path: str) -> str:
    """ORT's quantization pre-processing (graph optimisation + ONNX shape inference), one file out."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(fp32_path, out_path, skip_symbolic_shape=True)
    except Exception as e:  # noqa: BLE001 - any failure here: quantize the plain model instead
        log.warning("quant_pre_process failed on %s (%s: %s); quantizing the model without it",
                    fp32_path, type(e).__name__, e)
        return fp32_path
    return out_path


def quantize_int8(fp32_path: str, out_path: str, calibration, options: OrtInt8Options | None = None,
                  workdir: str | None = None, progress: bool = True) -> dict:
    """Static QDQ int8 quantization of ``fp32_path`` calibrated on ``calibration`` images; returns a summary."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    options = options or OrtInt8Options()
    workdir = workdir or os.path.dirname(os.path.abspath(out_path))
    t0 = time.time()
    pre = pre_process(fp32_path, os.path.join(workdir, "model.preprocessed.onnx"))
    model = onnx.load(pre)
    input_name = next(i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer})
    exclude = resolve_nodes(model, options.keep_float)
    act, weight, sym_act = SCHEMES[options.scheme]
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile,
              "distribution": CalibrationMethod.Distribution}[options.calibrate_method]
    extra = {"ActivationSymmetric": sym_act, "WeightSymmetric": True, "CalibStridedMinMax": 1,
             "CalibPercentile": options.percentile, "QuantizeBias": options.quantize_bias}
    reader = ImageCalibrationReader(calibration, input_name, options.batch_size, progress)
    try:
        quantize_static(pre, out_path, reader, quant_format=QuantFormat.QDQ, per_channel=options.per_channel,
                        reduce_range=options.reduce_range, activation_type=getattr(QuantType, act),
                        weight_type=getattr(QuantType, weight), nodes_to_exclude=exclude or None,
                        calibrate_method=method, extra_options=extra)
    except ExportError:
        raise
    except Exception as e:  # noqa: BLE001 - name the model and setting rather than an ORT internals trace
        raise ExportError(f"ONNX Runtime int8 quantization of {fp32_path} ({options.scheme}, "
                          f"{options.calibrate_method}) failed: {type(e).__name__}: {e}") from e
    finally:
        reader.close()
    q = onnx.load(out_path)
    n_q = sum(1 for n in q.graph.node if n.op_type == "QuantizeLinear")
    summary = {"options": options.to_dict(), "kept_float_nodes": exclude, "quantize_linear_nodes": n_q,
               "calibration_images": len(calibration), "seconds": round(time.time() - t0, 1)}
    log.info("onnxruntime int8 (%s, %s): %d QuantizeLinear nodes, %d nodes kept float, %.1fs", options.scheme,
             options.calibrate_method, n_q, len(exclude), summary["seconds"])
    return summary
