"""TensorRT fp16 / int8 engines, built where ``tensorrt`` and a CUDA GPU are present.

Not built in this project's CI: ``pip install tensorrt`` fails on the CI machines and the lent
GPU machines have no TensorRT, so this path is kept thin and typed against the documented API.
What it consumes is verifiable here, through ONNX Runtime:

* int8 comes from an explicitly quantized ONNX (QDQ, symmetric int8 activations and weights,
  per-channel weights): :func:`qdq_onnx`. TensorRT 11 removed the implicit-quantization builder
  flags and calibrators, so this is the only int8 route there; TensorRT 10 reads the same file.
* fp16 comes from an fp16 ONNX (:func:`fp16_onnx`, float I/O kept) built as a strongly typed
  network (TensorRT 11; available since 10). On TensorRT 10 the legacy weakly typed path (fp32
  ONNX + ``BuilderFlag.FP16`` / ``INT8``) is kept behind ``weak_typing=True``.

Engines are specific to the GPU model and TensorRT version that built them; the manifest says so.
The engine is built and run by the SDK's code (:func:`sdk.backends.build_tensorrt_engine`,
:class:`sdk.backends.TensorRTRunner`), so the parity gate measures what the device runs.
"""

from __future__ import annotations

import logging
import os

from export.errors import BackendUnavailable
from sdk.backends import build_tensorrt_engine, nvidia_gpu_name, runtime_status

log = logging.getLogger(__name__)

CI_NOTE = ("TensorRT engines are not built in this project's CI (no TensorRT or CUDA GPU there); "
           "this path is typed against the documented TensorRT 10/11 API.")


def tensorrt_status() -> tuple[bool, str]:
    """(available, reason): the SDK's own check (``tensorrt``, cuda-python and an NVIDIA GPU), so the
    exporter builds engines exactly where the SDK can run them."""
    ok, why = runtime_status("tensorrt")
    if not ok:
        return False, why
    import tensorrt as trt

    return True, f"tensorrt {trt.__version__}"


def require_tensorrt() -> None:
    ok, reason = tensorrt_status()
    if not ok:
        raise BackendUnavailable(f"backend 'tensorrt' is not available here: {reason}")


def qdq_onnx(fp32_path: str, out_path: str, calibration, calibrate_method: str = "entropy",
             keep_float: tuple[str, ...] = (), workdir: str | None = None, progress: bool = True) -> dict:
    """Explicitly quantized ONNX for TensorRT: QDQ, symmetric int8 (zero points 0), per-channel weights,
    float biases. ONNX Runtime runs it too, which is how it is verified where TensorRT is absent."""
    from export.ort_quantize import OrtInt8Options, quantize_int8

    opts = OrtInt8Options(scheme="s8s8-symmetric", calibrate_method=calibrate_method, per_channel=True,
                          keep_float=keep_float, quantize_bias=False)
    return quantize_int8(fp32_path, out_path, calibration, opts, workdir=workdir, progress=progress)


def fp16_onnx(fp32_path: str, out_path: str) -> str:
    """fp16 weights and compute, float32 input/output (for a strongly typed TensorRT network)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(fp32_path), keep_io_types=True)
    onnx.save(model, out_path)
    return out_path


def build_engine(onnx_path: str, engine_path: str, precision: str, *, weak_typing: bool = False,
                 max_batch: int = 64, opt_batch: int = 32, workspace_bytes: int = 2 << 30) -> dict:
    """Serialise an engine for ``onnx_path`` (dynamic batch 1..max_batch) through the SDK's one build
    path, :func:`sdk.backends.build_tensorrt_engine`; returns what the manifest records of it."""
    require_tensorrt()
    import tensorrt as trt

    with open(onnx_path, "rb") as f:
        blob = build_tensorrt_engine(f.read(), precision, where=onnx_path, max_batch=max_batch, opt_batch=opt_batch,
                                     workspace_bytes=workspace_bytes, weak_typing=weak_typing)
    with open(engine_path, "wb") as f:
        f.write(blob)
    return {"tensorrt": trt.__version__, "gpu": nvidia_gpu_name(0), "max_batch": max_batch,
            "strongly_typed": not weak_typing, "source_onnx": os.path.basename(onnx_path)}
