"""ONNX Runtime static int8 quantization (QDQ format) of the fp32 ONNX embedder.

Why these defaults: per-channel int8 weights keep ResNet accuracy; the scheme is ``auto``:
unsigned activations with signed weights (U8S8) where this CPU's int8 dot products are exact
(VNNI / AMX / ARM: there U8S8 ran about 3x faster than S8S8), signed activations (S8S8) where
they are not, because U8S8 saturates in int16 there (a fine-tuned EfficientNet-Lite0 lost 3.3
Recall@1 as U8S8 and nothing as S8S8 on an AVX2-only EPYC, see bench/RESULTS.md);
``quant_pre_process`` runs with symbolic shape
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
from sdk.cpu import int8_dot_exact, int8_dot_note

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

    scheme: str = "auto"  # "auto": u8s8 where int8 dot products are exact here (sdk.cpu), else s8s8
    scheme_chosen_for: str = ""  # what "auto" saw: recorded in the manifest
    calibrate_method: str = "minmax"
    per_channel: bool = True
    reduce_range: bool = False  # 7-bit weights: only for CPUs without VNNI
    # node names / globs, or "head": the embedding head (a float Gemm costs ~nothing and raised the mean cosine
    # to fp32 from 0.993 to 0.996 on a trained Flowers ResNet-18, see bench/RESULTS.md)
    keep_float: tuple[str, ...] = ("head",)
    percentile: float = 99.999  # for calibrate_method="percentile"
    quantize_bias: bool = True  # int32 biases; off for TensorRT, which keeps biases float and fuses them
    batch_size: int = 8
    # accuracy control (export.ort_accuracy_control): keep the most sensitive nodes float until the
    # validation Recall@1 drop is <= max_drop points; used by the exporter, not by quantize_int8 itself
    accuracy_control: bool = True
    max_drop: float = 0.3
    max_iterations: int = 20  # re-quantize + validate steps
    ranking_images: int = 32  # calibration images on which each node's sensitivity is measured

    def __post_init__(self):
        if self.scheme == "auto":
            self.scheme = "u8s8" if int8_dot_exact() else "s8s8"
            self.scheme_chosen_for = int8_dot_note()
        if self.scheme not in SCHEMES:
            raise ExportError(f"unknown ONNX Runtime int8 scheme {self.scheme!r}; choose from "
                              f"{['auto', *sorted(SCHEMES)]}")
        if self.calibrate_method not in CALIBRATION_METHODS:
            raise ExportError(f"unknown calibration method {self.calibrate_method!r}; "
                              f"choose from {CALIBRATION_METHODS}")
        if self.max_drop < 0 or self.max_iterations < 1 or self.ranking_images < 1:
            raise ExportError("ONNX Runtime accuracy control needs max_drop >= 0, max_iterations >= 1 and "
                              "ranking_images >= 1")
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


class OrtQuantizer:
    """Static QDQ int8 quantization of one fp32 ONNX model, calibrated once and re-quantizable.

    Why a class: accuracy control quantizes the same model many times with different nodes kept
    float (or only one node quantized); pre-processing and calibration depend on neither, so they
    run once: the tensor ranges go to an ORT calibration cache (``calibration_cache_path`` of
    ``quantize_static``) that every later ``quantize`` call reads instead of re-running the images.
    """

    def __init__(self, fp32_path: str, calibration, options: OrtInt8Options | None = None,
                 workdir: str | None = None, progress: bool = True):
        self.fp32_path = fp32_path
        self.calibration = calibration
        self.options = options or OrtInt8Options()
        self.workdir = workdir or os.path.dirname(os.path.abspath(fp32_path))
        self.progress = progress
        self.preprocessed = pre_process(fp32_path, os.path.join(self.workdir, "model.preprocessed.onnx"))
        model = onnx.load(self.preprocessed)
        self.node_names = [n.name for n in model.graph.node]
        self.input_name = next(i.name for i in model.graph.input
                               if i.name not in {t.name for t in model.graph.initializer})
        self.base_exclude = resolve_nodes(model, self.options.keep_float)
        self.cache_path = os.path.join(self.workdir, f"ort-calibration-{id(self):x}.json")

    def quantize(self, out_path: str, keep_float=(), only=None) -> dict:
        """Quantize into ``out_path`` keeping ``keep_float`` (node names) float on top of the options'
        ``keep_float``, or, with ``only``, quantizing just those nodes; returns a summary."""
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        options = self.options
        t0 = time.time()
        exclude = self.base_exclude + [n for n in keep_float if n not in self.base_exclude]
        act, weight, sym_act = SCHEMES[options.scheme]
        method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                  "percentile": CalibrationMethod.Percentile,
                  "distribution": CalibrationMethod.Distribution}[options.calibrate_method]
        extra = {"ActivationSymmetric": sym_act, "WeightSymmetric": True, "CalibStridedMinMax": 1,
                 "CalibPercentile": options.percentile, "QuantizeBias": options.quantize_bias}
        cached = os.path.isfile(self.cache_path)
        reader = None if cached else ImageCalibrationReader(self.calibration, self.input_name, options.batch_size,
                                                            self.progress)
        try:
            quantize_static(self.preprocessed, out_path, reader, quant_format=QuantFormat.QDQ,
                            per_channel=options.per_channel, reduce_range=options.reduce_range,
                            activation_type=getattr(QuantType, act), weight_type=getattr(QuantType, weight),
                            nodes_to_quantize=list(only) if only else None, nodes_to_exclude=exclude or None,
                            calibrate_method=method, extra_options=extra, calibration_cache_path=self.cache_path)
        except ExportError:
            raise
        except Exception as e:  # noqa: BLE001 - name the model and setting rather than an ORT internals trace
            raise ExportError(f"ONNX Runtime int8 quantization of {self.fp32_path} ({options.scheme}, "
                              f"{options.calibrate_method}) failed: {type(e).__name__}: {e}") from e
        finally:
            if reader is not None:
                reader.close()
        q = onnx.load(out_path)
        n_q = sum(1 for n in q.graph.node if n.op_type == "QuantizeLinear")
        summary = {"options": options.to_dict(), "host_int8_dot_exact": int8_dot_exact(),
                   "kept_float_nodes": exclude, "quantize_linear_nodes": n_q,
                   "calibration_images": len(self.calibration), "seconds": round(time.time() - t0, 1)}
        if only:
            summary["only_nodes"] = list(only)
        return summary


# ops whose int8 form only moves or selects values: keeping one float gains nothing, so they are no candidates
DATA_MOVEMENT_OPS = frozenset({"Flatten", "Reshape", "Squeeze", "Unsqueeze", "Transpose", "Slice", "Split", "Gather",
                               "GatherElements", "MaxPool", "Pad", "Where", "TopK"})


def quantized_nodes(q_model: onnx.ModelProto) -> list[str]:
    """Names of the nodes of a QDQ model that compute in int8: an op ONNX Runtime quantizes (its QDQ / QOperator
    registries, minus :data:`DATA_MOVEMENT_OPS`) reading at least one DequantizeLinear output."""
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    ops = (set(QDQRegistry) | set(QLinearOpsRegistry)) - DATA_MOVEMENT_OPS
    dq_outputs = {o for n in q_model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return [n.name for n in q_model.graph.node if n.op_type in ops and any(i in dq_outputs for i in n.input)]


def quantize_int8(fp32_path: str, out_path: str, calibration, options: OrtInt8Options | None = None,
                  workdir: str | None = None, progress: bool = True) -> dict:
    """Static QDQ int8 quantization of ``fp32_path`` calibrated on ``calibration`` images; returns a summary."""
    quantizer = OrtQuantizer(fp32_path, calibration, options, workdir, progress)
    summary = quantizer.quantize(out_path)
    o = quantizer.options
    log.info("onnxruntime int8 (%s, %s): %d QuantizeLinear nodes, %d nodes kept float, %.1fs", o.scheme,
             o.calibrate_method, summary["quantize_linear_nodes"], len(summary["kept_float_nodes"]),
             summary["seconds"])
    return summary
