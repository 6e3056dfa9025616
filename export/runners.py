"""How the exporter runs a variant to measure it: the SDK's own runners, plus the PyTorch reference.

Why the SDK's runners: the parity gate must measure a variant exactly as devices will run it,
with the ``runtime_hints`` written into the manifest, so there is one implementation of "run
this model" (``sdk.backends``) and the exporter only names its input and output. OpenVINO
variants can be measured before they are saved (an in-memory ``ov.Model`` from NNCF).
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import numpy as np
from tqdm.auto import tqdm

from export.onnx_export import INPUT_NAME, OUTPUT_NAME
from sdk.backends import OnnxRuntimeRunner, OpenVINORunner, Runner, TensorRTRunner

log = logging.getLogger(__name__)


def onnxruntime_runner(path: str, threads: int | None = None, hints: dict | None = None) -> Runner:
    """ONNX Runtime on the CPU for an exported ``.onnx`` file."""
    return OnnxRuntimeRunner(path, input_name=INPUT_NAME, output_name=OUTPUT_NAME, hints=hints, threads=threads)


def openvino_runner(model: Any, hints: dict[str, Any] | None = None, precision: str = "fp32",
                    threads: int | None = None) -> Runner:
    """OpenVINO on the CPU for an IR/ONNX file or an in-memory ``ov.Model``, compiled with ``hints``.

    An fp32 variant without a precision hint runs in f32 (as the SDK runs it), not bf16.
    """
    return OpenVINORunner(model, input_name=INPUT_NAME, output_name=OUTPUT_NAME, precision=precision,
                          hints=hints, threads=threads)


def tensorrt_runner(engine_path: str, hints: dict | None = None, precision: str = "fp16") -> Runner:
    """The SDK's TensorRT runner on a serialised engine (what a device with the bundle runs)."""
    return TensorRTRunner(engine_path, input_name=INPUT_NAME, output_name=OUTPUT_NAME, precision=precision,
                          hints=hints)


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


__all__ = ["onnxruntime_runner", "openvino_runner", "tensorrt_runner", "TorchRunner", "embed", "INPUT_NAME", "OUTPUT_NAME"]
