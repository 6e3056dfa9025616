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
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from export.errors import BackendUnavailable, ExportError

log = logging.getLogger(__name__)

CI_NOTE = ("TensorRT engines are not built in this project's CI (no TensorRT or CUDA GPU there); "
           "this path is typed against the documented TensorRT 10/11 API.")


def tensorrt_status() -> tuple[bool, str]:
    """(available, reason): ``tensorrt`` importable and a CUDA GPU visible to torch."""
    try:
        import tensorrt as trt  # noqa: F401
    except ImportError as e:
        return False, f"the tensorrt Python package is not installed ({e})"
    try:
        import torch

        if not torch.cuda.is_available():
            return False, "no CUDA GPU is visible (torch.cuda.is_available() is False)"
    except ImportError:
        return False, "torch is needed for TensorRT buffers"
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


def _major(trt) -> int:
    return int(str(trt.__version__).split(".")[0])


def build_engine(onnx_path: str, engine_path: str, precision: str, image_size: int, *, weak_typing: bool = False,
                 max_batch: int = 64, opt_batch: int = 32, workspace_bytes: int = 2 << 30) -> dict:
    """Parse ``onnx_path`` and serialize an engine with a dynamic batch profile (1..max_batch)."""
    require_tensorrt()
    import tensorrt as trt

    major = _major(trt)
    if weak_typing and major >= 11:
        raise ExportError("TensorRT 11 has no weakly typed builder flags; build from fp16 / QDQ ONNX instead")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if not weak_typing and major < 11:  # strong typing is always on (and the flag gone) in 11
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    with open(onnx_path, "rb") as f:
        if not parser.parse(f.read()):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ExportError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if weak_typing:
        config.set_flag(trt.BuilderFlag.FP16)
        if precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)  # scales come from the QDQ nodes
    profile = builder.create_optimization_profile()
    name = network.get_input(0).name
    shape = (3, image_size, image_size)
    profile.set_shape(name, (1, *shape), (min(opt_batch, max_batch), *shape), (max_batch, *shape))
    config.add_optimization_profile(profile)
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise ExportError(f"TensorRT failed to build an engine from {onnx_path} (see the TensorRT log above)")
    with open(engine_path, "wb") as f:
        f.write(bytes(blob))
    import torch

    return {"tensorrt": trt.__version__, "gpu": torch.cuda.get_device_name(0), "max_batch": max_batch,
            "strongly_typed": not weak_typing, "source_onnx": os.path.basename(onnx_path)}


class TensorRTRunner:
    """Runs a serialized engine on CUDA with torch-allocated buffers (enqueueV3 API, TensorRT 10/11)."""

    def __init__(self, engine_path: str):
        require_tensorrt()
        import tensorrt as trt
        import torch

        self.torch = torch
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        with open(engine_path, "rb") as f:
            self.engine = self.runtime.deserialize_cuda_engine(f.read())
        if self.engine is None:
            raise ExportError(f"{engine_path}: TensorRT could not deserialize the engine")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        self.max_batch = int(self.engine.get_tensor_profile_shape(self.input, 0)[2][0])

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        torch = self.torch
        outs = []
        for s in range(0, len(batch), self.max_batch):
            x = torch.from_numpy(np.ascontiguousarray(batch[s:s + self.max_batch], np.float32)).cuda()
            self.context.set_input_shape(self.input, tuple(x.shape))
            y = torch.empty(tuple(self.context.get_tensor_shape(self.output)), dtype=torch.float32, device="cuda")
            self.context.set_tensor_address(self.input, x.data_ptr())
            self.context.set_tensor_address(self.output, y.data_ptr())
            stream = torch.cuda.current_stream()
            if not self.context.execute_async_v3(stream.cuda_stream):
                raise ExportError("TensorRT inference failed")
            stream.synchronize()
            outs.append(y.cpu().numpy())
        return np.concatenate(outs)


def runtime_hints(precision: str) -> dict[str, Any]:
    return {}
