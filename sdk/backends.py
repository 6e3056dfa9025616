"""Inference runners: one small class per runtime behind one interface, ``run(batch) -> outputs``.

Why: a bundle holds the same network as ONNX (ONNX Runtime, OpenVINO), OpenVINO IR (.xml/.bin)
and TensorRT engines, in several precisions. The :class:`~sdk.retriever.Retriever` asks
:func:`plan` which variants to try, in order, and :func:`open_runner` for the first that loads;
nothing else in the SDK knows a runtime's API. Runtimes are imported only when used, so a
device needs just the one it runs.

Runtime choice (``backend="auto"``): TensorRT when it and an NVIDIA GPU are present, else
OpenVINO, else ONNX Runtime, among the runtimes the bundle has variants for. Precision
(``precision="auto"``): among variants that passed the exporter's parity gate, the fastest —
by a throughput the exporter measured (``parity["images_per_s"]``) when recorded, else by the
usual order for that runtime (int8 first; fp16 only where it is fast: on GPUs).
"""

from __future__ import annotations

from sdk.errors import IbcError

import importlib.util
import logging
import os
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from sdk.bundle import BACKENDS, BundleError, Manifest, Variant
from sdk.cpu import int8_dot_exact

log = logging.getLogger(__name__)

RUNTIME_ORDER = ("tensorrt", "openvino", "onnxruntime")
# the names a person may type for each runtime (ibc-export --backend, ibc-retrieve --backend)
BACKEND_ALIASES = {"onnx": "onnxruntime", "onnxruntime": "onnxruntime", "ort": "onnxruntime",
                   "openvino": "openvino", "ov": "openvino", "tensorrt": "tensorrt", "trt": "tensorrt"}
# OpenVINO's INFERENCE_PRECISION_HINT for each float precision: without one its CPU plugin runs an
# fp32 model in bf16 on CPUs with AVX-512-bf16/AMX, which is not what the parity gate measured
OPENVINO_PRECISION_HINTS = {"fp32": "f32", "fp16": "f16", "bf16": "bf16"}
# Without a measured throughput, the usual speed order of precisions on each runtime (fastest first).
PRECISION_SPEED = {
    "tensorrt": ("int8", "fp16", "bf16", "fp32"),
    "openvino": ("int8", "bf16", "fp16", "fp32"),  # CPU: fp16 IR runs as f32/bf16 anyway
    "onnxruntime": ("int8", "fp32", "bf16", "fp16"),  # CPU EP: fp16 falls back to slow casts
}


class BackendError(IbcError, RuntimeError):
    """A runtime is missing, cannot load a model file, or fails to run it."""


# --------------------------------------------------------------------------------- availability
def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _cudart():
    """cuda-python's runtime API, either module layout (cuda.bindings >= 12.6, or legacy ``cuda``)."""
    try:
        from cuda.bindings import runtime as cudart  # type: ignore
    except ImportError:
        from cuda import cudart  # type: ignore
    return cudart


def nvidia_gpu_name(index: int = 0) -> str:
    """The GPU's name as CUDA reports it (engines are specific to it), or "unknown GPU"."""
    try:
        cudart = _cudart()
        err, prop = cudart.cudaGetDeviceProperties(index)
        if err != cudart.cudaError_t.cudaSuccess:
            return "unknown GPU"
        name = prop.name
        return (name.decode(errors="replace") if isinstance(name, bytes) else str(name)).rstrip("\x00")
    except Exception:  # noqa: BLE001 - a name is only for notes
        return "unknown GPU"


def nvidia_gpu_count() -> int:
    try:
        cudart = _cudart()
        err, count = cudart.cudaGetDeviceCount()
        return int(count) if err == cudart.cudaError_t.cudaSuccess else 0
    except Exception:  # no cuda-python or no driver: no usable GPU
        return 0


def runtime_status(backend: str) -> tuple[bool, str]:
    """(usable, why not) for one runtime on this machine."""
    if backend == "onnxruntime":
        return (True, "") if _has_module("onnxruntime") else (False, "onnxruntime is not installed")
    if backend == "openvino":
        return (True, "") if _has_module("openvino") else (False, "openvino is not installed")
    if backend == "tensorrt":
        if not _has_module("tensorrt"):
            return False, "tensorrt is not installed"
        if not (_has_module("cuda.bindings") or _has_module("cuda")):
            return False, "cuda-python is not installed (needed for TensorRT buffers)"
        if nvidia_gpu_count() == 0:
            return False, "no NVIDIA GPU visible"
        return True, ""
    return False, f"unknown backend {backend!r}"


def runtime_hints(backend: str, precision: str, *, float_precision: str = "f32", max_batch: int | None = None) -> dict:
    """The ``runtime_hints`` a variant carries in the manifest: the exporter writes them, the parity
    gate measures under them and the runners below apply them (missing ones default to these).

    OpenVINO: the ``INFERENCE_PRECISION_HINT`` of its precision (int8: of the layers left in float,
    ``float_precision``). TensorRT: the engine's largest batch. ONNX Runtime: none.
    """
    if backend == "openvino":
        if precision == "int8":
            return {"INFERENCE_PRECISION_HINT": float_precision}
        if precision not in OPENVINO_PRECISION_HINTS:
            raise BackendError(f"OpenVINO has no {precision!r} variant; choose from fp32, fp16, bf16, int8")
        return {"INFERENCE_PRECISION_HINT": OPENVINO_PRECISION_HINTS[precision]}
    if backend == "tensorrt":
        return {"max_batch": int(max_batch)} if max_batch else {}
    return {}


# ------------------------------------------------------------------------------------- planning
@dataclass
class Candidate:
    variant: Variant
    reason: str


def _speed_key(v: Variant) -> tuple:
    measured = v.parity.get("images_per_s")  # what the exporter's parity gate measured
    measured = measured if isinstance(measured, (int, float)) and not isinstance(measured, bool) else None
    order = PRECISION_SPEED.get(v.backend, ())
    rank = order.index(v.precision) if v.precision in order else len(order)
    return (0, -float(measured)) if measured is not None else (1, rank)


def saturation_risk(v: Variant) -> str | None:
    """Why an ONNX Runtime U8S8 int8 variant cannot be trusted on this CPU, else None.

    Its parity gate ran on a CPU whose int8 dot products are exact (VNNI / AMX / ARM); here u8 x s8
    pairs saturate in int16, so the gate's numbers do not hold (see :mod:`sdk.cpu`). A U8S8 variant
    gated on a saturating CPU was measured under saturation, and S8S8 does not saturate.
    """
    if v.backend != "onnxruntime" or v.precision != "int8":
        return None
    q = (v.parity.get("build") or {}).get("quantization") or {}
    if (q.get("options") or {}).get("scheme") != "u8s8" or not q.get("host_int8_dot_exact") or int8_dot_exact():
        return None
    return ("its U8S8 int8 was gated on a CPU with exact int8 dot products (VNNI/AMX/ARM) and saturates on this "
            "one (x86 without VNNI); export with --ort-scheme s8s8 for such CPUs")


def plan(manifest: Manifest, backend: str = "auto", precision: str = "auto") -> tuple[list[Candidate], list[str]]:
    """Variants to try, best first, plus notes on what was passed over and why."""
    if backend != "auto" and backend not in BACKENDS:
        raise BackendError(f"backend must be 'auto' or one of {', '.join(BACKENDS)}; got {backend!r}")
    notes: list[str] = []
    runtimes = RUNTIME_ORDER if backend == "auto" else (backend,)
    out: list[Candidate] = []
    for rt in runtimes:
        variants = [v for v in manifest.variants if v.backend == rt]
        if not variants:
            if backend != "auto":
                raise BundleError(f"the bundle has no {rt} variant; it has {[v.name for v in manifest.variants]}")
            continue
        ok, why = runtime_status(rt)
        if not ok:
            notes.append(f"{rt}: skipped, {why}")
            if backend != "auto":
                raise BackendError(f"backend {rt!r} was asked for but {why}")
            continue
        if precision != "auto":
            chosen = [v for v in variants if v.precision == precision]
            if not chosen:
                if backend != "auto":
                    raise BundleError(f"the bundle has no {rt} {precision} variant; {rt} has "
                                      f"{[v.precision for v in variants]}")
                notes.append(f"{rt}: no {precision} variant")
                continue
            for v in chosen:
                risk = saturation_risk(v)
                if risk:
                    log.warning("variant %s: %s; using it because precision=%r was asked", v.name, risk, precision)
                if not v.passed:
                    log.warning("variant %s did not pass its parity gate; using it because precision=%r was asked",
                                v.name, precision)
                out.append(Candidate(v, f"asked for {precision}" + ("" if v.passed else " (parity gate FAILED)")))
            continue
        risks = {v.name: saturation_risk(v) for v in variants}
        passed = [v for v in variants if v.passed and not risks[v.name]]
        for v in variants:
            if not v.passed:
                notes.append(f"{v.name}: skipped, did not pass its parity gate")
            elif risks[v.name]:
                notes.append(f"{v.name}: skipped, {risks[v.name]}")
        for v in sorted(passed, key=_speed_key):
            measured = _speed_key(v)
            why = (f"fastest passing variant ({-measured[1]:.1f} images/s measured by the exporter)"
                   if measured[0] == 0 else f"passed parity; {v.precision} is the usual fastest on {rt}")
            out.append(Candidate(v, why))
    if not out:
        raise BackendError(
            "no usable variant in the bundle"
            + (f" for backend={backend!r}" if backend != "auto" else "")
            + (f" precision={precision!r}" if precision != "auto" else "")
            + ": " + ("; ".join(notes) or "none listed")
        )
    return out, notes


# -------------------------------------------------------------------------------------- runners
class Runner:
    """Runs the embedding network on one preprocessed batch. Thread-safe ``run``."""

    backend = ""
    accepts_model_objects = False  # OpenVINO also runs an in-memory ``ov.Model`` (the exporter's case)

    def __init__(self, model_path: str, *, input_name: str, output_name: str, precision: str = "fp32",
                 hints: dict | None = None, threads: int | None = None):
        if isinstance(model_path, (str, os.PathLike)):
            model_path = os.fspath(model_path)
            if not os.path.isfile(model_path):
                raise BackendError(f"{model_path}: model file missing")
        elif not self.accepts_model_objects:
            raise BackendError(f"{self.backend} needs a model file path, got {type(model_path).__name__}")
        self.model_path = model_path
        self.input_name = input_name
        self.output_name = output_name
        self.precision = precision
        self.hints = dict(hints or {})
        self.threads = threads

    def run(self, batch: np.ndarray) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    @property
    def output_dim(self) -> int | None:
        """The embedding width the loaded model declares (None when its last axis is dynamic)."""
        return None

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.run(batch)

    @property
    def source(self) -> str:
        """The model file, or a description of an in-memory model (for messages)."""
        if isinstance(self.model_path, str):
            return self.model_path
        return f"<in-memory {type(self.model_path).__name__}>"

    def describe(self) -> dict:
        return {"backend": self.backend, "file": os.path.basename(self.source), "precision": self.precision,
                "threads": self.threads, "hints": self.hints}

    def close(self) -> None:
        pass

    def _pick(self, names: list[str], wanted: str, what: str) -> str:
        if wanted in names:
            return wanted
        if len(names) == 1:
            log.warning("%s: %s %r not found, using the only one, %r", self.source, what, wanted, names[0])
            return names[0]
        raise BackendError(f"{self.source}: no {what} named {wanted!r}; it has {names}")


class OnnxRuntimeRunner(Runner):
    """ONNX Runtime session. Hints: ``providers`` (list), ``session_config`` (dict of config entries)."""

    backend = "onnxruntime"

    def __init__(self, model_path: str, **kw: Any):
        super().__init__(model_path, **kw)
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        if self.threads:
            so.intra_op_num_threads = int(self.threads)
            so.inter_op_num_threads = 1
        for key, value in dict(self.hints.get("session_config", {})).items():
            so.add_session_config_entry(str(key), str(value))
        available = ort.get_available_providers()
        providers = [p for p in self.hints.get("providers", ["CPUExecutionProvider"]) if p in available]
        try:
            self.session = ort.InferenceSession(self.model_path, so, providers=providers or ["CPUExecutionProvider"])
        except Exception as e:  # ORT raises its own Fail/InvalidGraph types
            raise BackendError(f"onnxruntime cannot load {self.model_path}: {e}") from None
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.input_name = self._pick(list(inputs), self.input_name, "input")
        self.output_name = self._pick([o.name for o in self.session.get_outputs()], self.output_name, "output")
        self._dtype = np.float16 if inputs[self.input_name].type == "tensor(float16)" else np.float32
        self.version = ort.__version__

    def run(self, batch: np.ndarray) -> np.ndarray:
        try:
            out = self.session.run([self.output_name], {self.input_name: batch.astype(self._dtype, copy=False)})[0]
        except Exception as e:
            raise BackendError(f"onnxruntime failed on a batch of shape {batch.shape}: {e}") from None
        return np.asarray(out, dtype=np.float32)

    @property
    def output_dim(self) -> int | None:
        shape = next(o.shape for o in self.session.get_outputs() if o.name == self.output_name)
        return _static_last(shape)

    def describe(self) -> dict:
        return {**super().describe(), "providers": self.session.get_providers(), "version": self.version}


class OpenVINORunner(Runner):
    """OpenVINO compiled model; reads ``.xml`` IR (``.bin`` beside it) or ``.onnx``.

    The variant's ``runtime_hints`` become compile properties (e.g. ``INFERENCE_PRECISION_HINT``,
    ``PERFORMANCE_HINT``, ``device``). An fp32 variant without a precision hint gets
    ``INFERENCE_PRECISION_HINT=f32``: on CPUs with AVX-512-bf16/AMX OpenVINO would otherwise run it
    in bf16, which is not what the parity gate measured. One infer request per thread.
    """

    backend = "openvino"
    accepts_model_objects = True

    def __init__(self, model_path: str, **kw: Any):
        super().__init__(model_path, **kw)
        import openvino as ov

        config = {k: v for k, v in self.hints.items() if k != "device"}
        for key, value in runtime_hints("openvino", self.precision).items():  # e.g. fp32 runs in f32, not bf16
            config.setdefault(key, value)
        if self.threads:
            config.setdefault("INFERENCE_NUM_THREADS", int(self.threads))
        device = str(self.hints.get("device", "CPU"))
        config = {k: (str(v) if not isinstance(v, (int, bool)) else v) for k, v in config.items()}
        try:
            core = ov.Core()
            model = core.read_model(self.model_path) if isinstance(self.model_path, str) else self.model_path
            self.compiled = core.compile_model(model, device, config)
        except Exception as e:
            raise BackendError(f"openvino cannot load {self.source} on {device} with {config}: {e}") from None
        self.config = config
        self.device = device
        ins = {name: p for p in self.compiled.inputs for name in p.get_names()}
        outs = {name: p for p in self.compiled.outputs for name in p.get_names()}
        self.input_name = self._pick(list(ins), self.input_name, "input")
        self.output_name = self._pick(list(outs), self.output_name, "output")
        self._output = outs[self.output_name]
        self._local = threading.local()
        self.version = ov.get_version()
        try:
            hint = self.compiled.get_property("INFERENCE_PRECISION_HINT")
            self.effective_precision = hint.to_string() if hasattr(hint, "to_string") else str(hint)
        except Exception:
            self.effective_precision = "?"

    def run(self, batch: np.ndarray) -> np.ndarray:
        req = getattr(self._local, "request", None)
        if req is None:
            req = self._local.request = self.compiled.create_infer_request()
        try:
            result = req.infer({self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})
            return np.array(result[self._output], dtype=np.float32, copy=True)
        except Exception as e:
            raise BackendError(f"openvino failed on a batch of shape {batch.shape}: {e}") from None

    @property
    def output_dim(self) -> int | None:
        shape = self._output.get_partial_shape()
        last = shape[shape.rank.get_length() - 1] if shape.rank.is_static and shape.rank.get_length() else None
        return int(last.get_length()) if last is not None and last.is_static else None

    def describe(self) -> dict:
        return {**super().describe(), "device": self.device, "config": self.config,
                "inference_precision": self.effective_precision, "version": self.version}


def tensorrt_major(trt) -> int:
    return int(str(trt.__version__).split(".")[0])


def build_tensorrt_engine(onnx_bytes: bytes, precision: str, *, where: str, max_batch: int = 64,
                          opt_batch: int | None = None, workspace_bytes: int = 2 << 30, weak_typing: bool = False,
                          logger=None) -> bytes:
    """The one TensorRT build path (the exporter's engines and the SDK's ``.onnx`` variants): a
    serialised engine with a dynamic batch profile 1..``max_batch``.

    Strongly typed by default: the ONNX carries its precision (an fp16 ONNX for fp16, Q/DQ nodes
    for int8). TensorRT 11 is always strongly typed and has no ``BuilderFlag.FP16`` / ``INT8`` /
    ``BF16`` any more; on TensorRT 10 the network is created with ``STRONGLY_TYPED``, and
    ``weak_typing=True`` keeps 10's builder flags for an fp32 ONNX (refused on 11).
    """
    import tensorrt as trt

    major = tensorrt_major(trt)
    if weak_typing and major >= 11:
        raise BackendError(f"{where}: TensorRT {trt.__version__} has no weakly typed builder flags; "
                           "build from an fp16 / Q/DQ ONNX instead")
    logger = logger or trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if not weak_typing and major < 11:  # 11: strong typing always on (the flag is deprecated, ignored)
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendError(f"tensorrt cannot parse {where}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    if weak_typing:  # TensorRT 10 only (checked above)
        flag = {"fp16": "FP16", "bf16": "BF16", "int8": "INT8"}.get(precision)
        if flag:
            config.set_flag(getattr(trt.BuilderFlag, flag))
        if precision == "int8":
            config.set_flag(trt.BuilderFlag.FP16)  # int8 layers' neighbours may run fp16; scales from Q/DQ
    inp = network.get_input(0)
    shape = list(inp.shape)[1:]
    if any(int(d) < 0 for d in shape):
        raise BackendError(f"{where}: TensorRT needs a static input shape apart from the batch, got {list(inp.shape)}")
    opt = min(opt_batch or max(1, max_batch // 2), max_batch)
    profile = builder.create_optimization_profile()
    profile.set_shape(inp.name, [1, *shape], [opt, *shape], [max_batch, *shape])
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BackendError(f"tensorrt failed to build an engine from {where} (see the TensorRT log above)")
    return bytes(serialized)


class TensorRTRunner(Runner):
    """TensorRT 10 / 11 engine on an NVIDIA GPU (name-based I/O API, ``execute_async_v3``).

    Reads a serialised engine (``.engine`` / ``.plan``, built for this GPU and TensorRT version)
    or builds one from ``.onnx`` through :func:`build_tensorrt_engine` (cached under
    ``~/.cache/ibc/tensorrt``). Buffers go through cuda-python. Hints: ``max_batch`` (default 64),
    ``workspace_mb``, ``weak_typing`` (TensorRT 10 only). ``run`` is serialised by a lock (one
    execution context). The exporter's parity gate measures engines through this class.
    """

    backend = "tensorrt"

    def __init__(self, model_path: str, **kw: Any):
        super().__init__(model_path, **kw)
        import tensorrt as trt

        self.trt = trt
        self.cudart = _cudart()
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.max_batch = int(self.hints.get("max_batch", 64))
        if self.model_path.endswith(".onnx"):
            engine_bytes = self._build_from_onnx(self.model_path)
        else:
            with open(self.model_path, "rb") as f:
                engine_bytes = f.read()
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(engine_bytes)
        if self.engine is None:
            raise BackendError(f"tensorrt cannot deserialise {self.model_path} (built for another GPU or TensorRT version?)")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        ins = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.input_name = self._pick(ins, self.input_name, "input")
        self.output_name = self._pick(outs, self.output_name, "output")
        self.in_dtype = trt.nptype(self.engine.get_tensor_dtype(self.input_name))
        self.out_dtype = trt.nptype(self.engine.get_tensor_dtype(self.output_name))
        self.context = self.engine.create_execution_context()
        self.stream = self._check(self.cudart.cudaStreamCreate())
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, bytes)
        self._lock = threading.Lock()
        self.version = trt.__version__

    def _check(self, result):
        err, *rest = result if isinstance(result, tuple) else (result,)
        if err != self.cudart.cudaError_t.cudaSuccess:
            raise BackendError(f"CUDA error {err}")
        return rest[0] if len(rest) == 1 else rest

    def _build_from_onnx(self, path: str) -> bytes:
        import hashlib

        trt = self.trt
        with open(path, "rb") as f:
            onnx_bytes = f.read()
        weak = bool(self.hints.get("weak_typing", False))
        key = hashlib.sha256(onnx_bytes + f"{self.precision}-{self.max_batch}-{weak}-{trt.__version__}".encode()
                             ).hexdigest()
        cache = os.path.join(os.path.expanduser("~/.cache/ibc/tensorrt"), key[:32] + ".engine")
        if os.path.isfile(cache):
            with open(cache, "rb") as f:
                return f.read()
        data = build_tensorrt_engine(onnx_bytes, self.precision, where=path, max_batch=self.max_batch,
                                     workspace_bytes=int(self.hints.get("workspace_mb", 2048)) << 20,
                                     weak_typing=weak, logger=self.logger)
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        tmp = cache + f".tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, cache)
        return data

    def _device_buffer(self, name: str, nbytes: int) -> int:
        ptr, size = self._buffers.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                self._check(self.cudart.cudaFree(ptr))
            ptr = self._check(self.cudart.cudaMalloc(nbytes))
            self._buffers[name] = (ptr, nbytes)
        return ptr

    def run(self, batch: np.ndarray) -> np.ndarray:
        cudart = self.cudart
        outs = []
        with self._lock:
            for start in range(0, len(batch), self.max_batch):
                x = np.ascontiguousarray(batch[start:start + self.max_batch], dtype=self.in_dtype)
                if not self.context.set_input_shape(self.input_name, x.shape):
                    raise BackendError(f"tensorrt refused input shape {x.shape}")
                out_shape = tuple(self.context.get_tensor_shape(self.output_name))
                y = np.empty(out_shape, dtype=self.out_dtype)
                d_in = self._device_buffer(self.input_name, x.nbytes)
                d_out = self._device_buffer(self.output_name, y.nbytes)
                self.context.set_tensor_address(self.input_name, d_in)
                self.context.set_tensor_address(self.output_name, d_out)
                self._check(cudart.cudaMemcpyAsync(d_in, x.ctypes.data, x.nbytes,
                                                   cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream))
                if not self.context.execute_async_v3(int(self.stream)):
                    raise BackendError("tensorrt execute_async_v3 failed")
                self._check(cudart.cudaMemcpyAsync(y.ctypes.data, d_out, y.nbytes,
                                                   cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream))
                self._check(cudart.cudaStreamSynchronize(self.stream))
                outs.append(y.astype(np.float32))
        return np.concatenate(outs)

    @property
    def output_dim(self) -> int | None:
        return _static_last(tuple(self.engine.get_tensor_shape(self.output_name)))

    def describe(self) -> dict:
        return {**super().describe(), "max_batch": self.max_batch, "version": self.version}

    def close(self) -> None:
        for ptr, _ in self._buffers.values():
            self.cudart.cudaFree(ptr)
        self._buffers.clear()


RUNNERS = {"onnxruntime": OnnxRuntimeRunner, "openvino": OpenVINORunner, "tensorrt": TensorRTRunner}


def _static_last(shape) -> int | None:
    last = shape[-1] if len(shape) else None
    return int(last) if isinstance(last, (int, np.integer)) and not isinstance(last, bool) and last > 0 else None


def open_runner(bundle_dir: str, manifest: Manifest, variant: Variant, threads: int | None = None) -> Runner:
    """Load ``variant`` of the bundle in its runtime; refuse a model whose output width is not the manifest's."""
    cls = RUNNERS.get(variant.backend)
    if cls is None:
        raise BackendError(f"no runner for backend {variant.backend!r}")
    path = os.path.join(os.fspath(bundle_dir), *variant.main_file.path.split("/"))
    runner = cls(path, input_name=manifest.input.name, output_name=manifest.output_name, precision=variant.precision,
                 hints=variant.runtime_hints, threads=threads)
    dim = runner.output_dim
    if dim is not None and dim != manifest.embedding_dim:
        runner.close()
        raise BundleError(f"{path}: the model outputs {dim}-d embeddings but the manifest says embedding_dim "
                          f"{manifest.embedding_dim} (variant {variant.name!r})")
    return runner


__all__ = ["BackendError", "Candidate", "Runner", "OnnxRuntimeRunner", "OpenVINORunner", "TensorRTRunner", "plan",
           "open_runner", "runtime_status", "saturation_risk", "runtime_hints", "build_tensorrt_engine",
           "nvidia_gpu_name", "RUNTIME_ORDER", "PRECISION_SPEED", "BACKEND_ALIASES", "OPENVINO_PRECISION_HINTS"]
