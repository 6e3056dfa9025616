"""OpenVINO IR variants (fp32, fp16, bf16, int8) of the fp32 ONNX embedder.

Why the runtime hints: OpenVINO's CPU plugin silently runs an "fp32" model in bf16 on CPUs with
AVX-512 bf16 / AMX (measured here: mean cosine 0.9936 to PyTorch on a ResNet-50 embedding), so
a variant only runs at the precision it claims when ``INFERENCE_PRECISION_HINT`` says so. The
hints below go into the manifest and the SDK passes them to ``core.compile_model``; parity is
measured with the same hints.

int8 uses NNCF post-training quantization. With ``accuracy_control`` it runs
``nncf.quantize_with_accuracy_control`` whose validation function returns our Recall@1 (through
:func:`sdk.metrics.evaluate`) on a held-out validation split, so the layers that hurt retrieval
most are reverted to float until the Recall@1 drop is within ``max_drop`` points.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass

import numpy as np

from export.errors import ExportError
from sdk.backends import runtime_hints as backend_hints

log = logging.getLogger(__name__)

PRESETS = ("performance", "mixed")
ACTIVATION_RANGES = ("mean_minmax", "minmax", "mean_quantile", "histogram")


@dataclass
class OvInt8Options:
    """Settings of :func:`quantize_int8` (recorded in the manifest)."""

    accuracy_control: bool = True
    max_drop: float = 0.3  # Recall@1 points on the validation split (accuracy control only)
    preset: str = "performance"  # performance: symmetric activations; mixed: asymmetric activations
    # Not NNCF's defaults (fast bias correction, mean-of-per-sample min/max): on a trained Flowers ResNet-18
    # these two raise the mean cosine to fp32 from 0.990 to 0.997 and the 1st percentile from 0.942 to 0.993
    # (bench/RESULTS.md): per-sample averaging clips the images with the largest activations.
    fast_bias_correction: bool = False
    activation_range: str = "minmax"
    overflow_fix: str = "first_layer_only"  # NNCF's default: 7-bit first-layer weights, for CPUs without VNNI
    subset_size: int = 300  # calibration images used for statistics
    keep_float: tuple[str, ...] = ()  # "head", or regex patterns of OpenVINO node names
    float_precision: str = "f32"  # INFERENCE_PRECISION_HINT for the layers left in float
    max_iterations: int = 30  # accuracy-control revert iterations
    batch_size: int = 32  # validation batches

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ExportError(f"unknown NNCF preset {self.preset!r}; choose from {PRESETS}")
        if self.activation_range not in ACTIVATION_RANGES:
            raise ExportError(f"activation_range must be one of {ACTIVATION_RANGES}, got {self.activation_range!r}")
        if self.overflow_fix not in ("first_layer_only", "enable", "disable"):
            raise ExportError(f"overflow_fix must be first_layer_only, enable or disable, got {self.overflow_fix!r}")
        if self.float_precision not in ("f32", "bf16", "f16"):
            raise ExportError(f"float_precision must be f32, bf16 or f16, got {self.float_precision!r}")
        self.keep_float = tuple(self.keep_float)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["keep_float"] = list(self.keep_float)
        return d


def runtime_hints(precision: str, int8_float_precision: str = "f32") -> dict:
    """The ``compile_model`` config under which a variant runs at the precision it claims
    (:func:`sdk.backends.runtime_hints`, which the SDK's runner applies too)."""
    return backend_hints("openvino", precision, float_precision=int8_float_precision)


def convert(onnx_path: str):
    """fp32 ONNX -> ``ov.Model`` (in memory)."""
    import openvino as ov

    try:
        return ov.convert_model(os.fspath(onnx_path))
    except Exception as e:  # noqa: BLE001 - conversion errors come in many types
        raise ExportError(f"OpenVINO could not convert {onnx_path}: {type(e).__name__}: {e}") from e


def save_ir(model, bundle_dir: str, rel_dir: str, compress_to_fp16: bool) -> list[str]:
    """Write ``model.xml`` + ``model.bin`` under ``bundle_dir/rel_dir``; return their bundle-relative paths."""
    import openvino as ov

    os.makedirs(os.path.join(bundle_dir, rel_dir), exist_ok=True)
    xml = f"{rel_dir}/model.xml"
    ov.save_model(model, os.path.join(bundle_dir, xml), compress_to_fp16=compress_to_fp16)
    return [xml, f"{rel_dir}/model.bin"]


class _NeedsWholeSet(Exception):
    """Raised for a one-image 'dataset': Recall@1 is a set metric, so NNCF must rank layers by outputs."""


def recall_at_1_validation(images, batch_size: int = 32):
    """An NNCF ``validation_fn``: (compiled model, item indices) -> (Recall@1 in [0, 1], None)."""
    from sdk.metrics import evaluate

    labels = images.labels

    def validate(compiled_model, items) -> tuple[float, None]:
        idx = np.fromiter((int(i) for i in items), dtype=np.int64)
        if len(idx) < 2:
            raise _NeedsWholeSet()
        out = compiled_model.output(0)
        chunks = []
        for s in range(0, len(idx), batch_size):
            batch = np.ascontiguousarray(images.array[idx[s:s + batch_size]])
            chunks.append(np.asarray(compiled_model(batch)[out], np.float32))
        emb = np.concatenate(chunks)
        return float(evaluate(emb, labels[idx], ks=(1,), nmi=False)["recall@1"]), None

    return validate


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if any(w in msg.lower() for w in ("revert", "metric", "drop", "accuracy")):
            self.lines.append(msg.strip()[:400])


def count_fake_quantize(model) -> int:
    return sum(1 for op in model.get_ops() if op.get_type_name() == "FakeQuantize")


def head_and_tail(model) -> tuple[list[str], list[str]]:
    """Names of the embedding head (the last MatMul) and of every op after it (bias, L2 normalisation).

    Why: NNCF otherwise puts FakeQuantize on the head output and on the norm, so the "normalised"
    embedding comes out with norms off by several percent and 8-bit resolution: a quantized
    L2-normalisation is worse than useless for cosine retrieval.
    """
    ops = list(model.get_ordered_ops())
    matmuls = [op for op in ops if op.get_type_name() == "MatMul"]
    if not matmuls:
        return [], []
    head = matmuls[-1]
    seen, stack = set(), [head]
    while stack:
        op = stack.pop()
        for out in op.outputs():
            for target in out.get_target_inputs():
                node = target.get_node()
                name = node.get_friendly_name()
                if name not in seen and node.get_type_name() not in ("Result",):
                    seen.add(name)
                    stack.append(node)
    tail = [op.get_friendly_name() for op in ops if op.get_friendly_name() in seen
            and op.get_type_name() not in ("Constant", "Result", "ShapeOf")]
    return [head.get_friendly_name()], tail


def _ignored_scope(model, keep_float: tuple[str, ...]):
    import nncf

    head, tail = head_and_tail(model)
    names = tail + (head if "head" in keep_float else [])
    patterns = [p for p in keep_float if p != "head"]
    if not names and not patterns:
        return None
    return nncf.IgnoredScope(names=names, patterns=patterns, validate=False)


def quantize_int8(model, calibration, validation=None, options: OvInt8Options | None = None) -> tuple[object, dict]:
    """NNCF int8 quantization of ``model`` (an ``ov.Model``); returns the quantized model and a summary.

    ``validation`` (labelled preprocessed images) is required when ``options.accuracy_control``.
    """
    import nncf

    options = options or OvInt8Options()
    t0 = time.time()
    cal = calibration.array
    cal_ds = nncf.Dataset(list(range(len(calibration))), lambda i: np.ascontiguousarray(cal[i:i + 1]))
    preset = nncf.QuantizationPreset.PERFORMANCE if options.preset == "performance" else nncf.QuantizationPreset.MIXED
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    advanced = AdvancedQuantizationParameters(
        overflow_fix=OverflowFix(options.overflow_fix),
        activations_range_estimator_params=getattr(RangeEstimatorParametersSet, options.activation_range.upper()))
    common = dict(preset=preset, subset_size=min(options.subset_size, len(calibration)),
                  fast_bias_correction=options.fast_bias_correction, model_type=None,
                  ignored_scope=_ignored_scope(model, options.keep_float))
    summary: dict = {"options": options.to_dict(), "calibration_images": min(options.subset_size, len(calibration))}
    capture = _Capture()
    nncf_log = logging.getLogger("nncf")
    # NNCF logs every step at INFO on its own handler: keep that for --verbose, capture it otherwise
    quiet = not log.isEnabledFor(logging.DEBUG)
    saved = [(h, h.level) for h in nncf_log.handlers]
    saved_level = nncf_log.level
    nncf_log.setLevel(logging.INFO)
    if quiet:
        for h, _ in saved:
            h.setLevel(logging.WARNING)
    nncf_log.addHandler(capture)
    try:
        if options.accuracy_control:
            if validation is None or validation.labels is None:
                raise ExportError("OpenVINO int8 with accuracy control needs a labelled validation set")
            from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

            val = validation.array
            val_ds = nncf.Dataset(list(range(len(validation))), lambda i: np.ascontiguousarray(val[i:i + 1]))
            restorer = AdvancedAccuracyRestorerParameters(max_num_iterations=options.max_iterations)
            quantized = nncf.quantize_with_accuracy_control(
                model, cal_ds, val_ds, recall_at_1_validation(validation, options.batch_size),
                max_drop=options.max_drop / 100.0, drop_type=nncf.DropType.ABSOLUTE,
                advanced_quantization_parameters=advanced, advanced_accuracy_restorer_parameters=restorer, **common)
            summary["validation_images"] = len(validation)
        else:
            quantized = nncf.quantize(model, cal_ds, advanced_parameters=advanced, **common)
    except ExportError:
        raise
    except Exception as e:  # noqa: BLE001 - NNCF failures: say which step and setting
        raise ExportError(f"NNCF int8 quantization failed ({'with' if options.accuracy_control else 'without'} "
                          f"accuracy control): {type(e).__name__}: {e}") from e
    finally:
        nncf_log.removeHandler(capture)
        nncf_log.setLevel(saved_level)
        for h, level in saved:
            h.setLevel(level)
    summary["fake_quantize_nodes"] = count_fake_quantize(quantized)
    summary["accuracy_control_log"] = capture.lines[-12:]
    summary["seconds"] = round(time.time() - t0, 1)
    log.info("openvino int8: %d FakeQuantize nodes, %.1fs", summary["fake_quantize_nodes"], summary["seconds"])
    return quantized, summary
