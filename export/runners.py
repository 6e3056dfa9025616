"""Minimal inference runners used to measure each variant: images (N, 3, H, W) -> embeddings (N, D).

Why our own and not the SDK's: the exporter must measure a variant exactly as built, with the
runtime hints it writes into the manifest, before the bundle exists. The OpenVINO runner
applies ``runtime_hints`` the same way the SDK does: as the ``config`` of
``core.compile_model(model, device, config)``.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable

import numpy as np
from tqdm.auto import tqdm

from export.onnx_export import INPUT_NAME

log = logging.getLogger(__name__)


class OnnxRuntimeRunner:
    """ONNX Runtime on the CPU (or the given providers)."""

    def __init__(self, path: str, providers: list[str] | None = None, threads: int | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(os.fspath(path), opts, providers=providers or ["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(batch, np.float32)})[0]


class OpenVinoRunner:
    """OpenVINO compiled with ``runtime_hints`` (e.g. ``{"INFERENCE_PRECISION_HINT": "f32"}``)."""

    def __init__(self, model: Any, hints: dict[str, Any] | None = None, device: str = "CPU"):
        import openvino as ov

        core = ov.Core()
        if isinstance(model, (str, os.PathLike)):
            model = core.read_model(os.fspath(model))
        self.compiled = core.compile_model(model, device, dict(hints or {}))
        self.request = self.compiled.create_infer_request()
        self.output = self.compiled.output(0)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        result = self.request.infer({0: np.ascontiguousarray(batch, np.float32)})
        return np.array(result[self.output], dtype=np.float32, copy=True)


class TorchRunner:
    """The PyTorch fp32 reference."""

    def __init__(self, module):
        import torch

        self.torch = torch
        self.module = module.eval()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        with self.torch.no_grad():
            return self.module(self.torch.from_numpy(np.ascontiguousarray(batch))).numpy()


def embed(runner: Callable[[np.ndarray], np.ndarray], images, batch_size: int = 32, desc: str = "embed",
          progress: bool = True) -> np.ndarray:
    """Embed every image of a :class:`export.images.PreprocessedImages` set, batch by batch."""
    out = []
    with tqdm(total=len(images), desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for batch in images.batches(batch_size):
            out.append(np.asarray(runner(batch), np.float32))
            bar.update(len(batch))
    return np.concatenate(out)


__all__ = ["OnnxRuntimeRunner", "OpenVinoRunner", "TorchRunner", "embed", "INPUT_NAME"]
