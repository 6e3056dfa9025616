"""PyTorch embedder -> one self-contained fp32 ONNX file, checked structurally and numerically.

Why these choices: the dynamo exporter (torch.export) is the maintained path; the model is saved
as a single file (no external data) because ONNX Runtime's ``quant_pre_process`` and OpenVINO
read it more reliably that way; the batch axis is dynamic so one file serves batch 1 and 32;
the input/output names are fixed because the bundle manifest and the SDK refer to them.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings

import numpy as np
import onnx
import torch

from export.errors import ExportError, NumericCheckError

log = logging.getLogger(__name__)

INPUT_NAME = "images"
OUTPUT_NAME = "embeddings"
DEFAULT_OPSET = 18
MIN_OPSET = 17
MAX_EXPORT_BATCH = 4096


@contextlib.contextmanager
def _quiet():
    """The exporter prints progress lines and FutureWarnings; keep them out of the CLI's output."""
    buf = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(buf):
        warnings.simplefilter("ignore")
        yield buf


def _export_dynamo(model: torch.nn.Module, example: torch.Tensor, path: str, opset: int) -> None:
    batch = torch.export.Dim("batch", min=1, max=MAX_EXPORT_BATCH)
    torch.onnx.export(model, (example,), path, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                      dynamic_shapes={"images": {0: batch}}, opset_version=opset, dynamo=True,
                      external_data=False, optimize=True, verbose=False)


def _export_torchscript(model: torch.nn.Module, example: torch.Tensor, path: str, opset: int) -> None:
    torch.onnx.export(model, (example,), path, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                      dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}, opset_version=opset,
                      dynamo=False, do_constant_folding=True)


def check_onnx(path: str, embedding_dim: int, image_size: int) -> onnx.ModelProto:
    """Full ``onnx.checker`` pass plus the interface the SDK relies on (names, dynamic batch, shapes)."""
    try:
        onnx.checker.check_model(path, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ExportError(f"{path}: onnx.checker rejected the exported model: {str(e).splitlines()[0]}") from None
    model = onnx.load(path)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET:
        raise ExportError(f"{path}: opset {opset} < {MIN_OPSET}")
    ins = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    outs = list(model.graph.output)
    if [i.name for i in ins] != [INPUT_NAME] or [o.name for o in outs] != [OUTPUT_NAME]:
        raise ExportError(f"{path}: expected input {INPUT_NAME!r} and output {OUTPUT_NAME!r}, got "
                          f"{[i.name for i in ins]} -> {[o.name for o in outs]}")
    dims = ins[0].type.tensor_type.shape.dim
    if len(dims) != 4 or dims[0].dim_value or [d.dim_value for d in dims[1:]] != [3, image_size, image_size]:
        raise ExportError(f"{path}: input shape is {[d.dim_param or d.dim_value for d in dims]}, "
                          f"expected [batch, 3, {image_size}, {image_size}] with a dynamic batch")
    odims = outs[0].type.tensor_type.shape.dim
    if len(odims) != 2 or odims[1].dim_value not in (0, embedding_dim):
        raise ExportError(f"{path}: output shape {[d.dim_param or d.dim_value for d in odims]}, "
                          f"expected [batch, {embedding_dim}]")
    return model


def export_onnx(embedder: torch.nn.Module, path: str, image_size: int, embedding_dim: int,
                opset: int = DEFAULT_OPSET, exporter: str = "dynamo") -> str:
    """Write ``embedder`` to ``path`` as fp32 ONNX with a dynamic batch axis and check it.

    ``exporter="dynamo"`` falls back to the TorchScript exporter (with a warning) if torch.export
    cannot trace the model; ``"torchscript"`` uses it directly.
    """
    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} is below the supported minimum {MIN_OPSET}")
    if exporter not in ("dynamo", "torchscript"):
        raise ExportError(f"unknown ONNX exporter {exporter!r}; use 'dynamo' or 'torchscript'")
    embedder = embedder.eval()
    example = torch.zeros(2, 3, image_size, image_size)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with torch.no_grad(), _quiet():
        if exporter == "dynamo":
            try:
                _export_dynamo(embedder, example, path, opset)
            except Exception as e:  # noqa: BLE001 - torch.export raises many types; the fallback is the remedy
                log.warning("dynamo ONNX export failed (%s: %s); retrying with the TorchScript exporter",
                            type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
                exporter = "torchscript"
        if exporter == "torchscript":
            _export_torchscript(embedder, example, path, opset)
    check_onnx(path, embedding_dim, image_size)
    log.info("exported %s (%s exporter, opset %d, %.1f MB)", path, exporter, opset, os.path.getsize(path) / 1e6)
    return path


def compare_embeddings(got: np.ndarray, want: np.ndarray) -> dict:
    """Max absolute difference and per-row cosine statistics of two (N, D) embedding arrays."""
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    if got.shape != want.shape:
        raise NumericCheckError(f"output shape {got.shape} differs from the reference {want.shape}")
    num = (got * want).sum(1)
    den = np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1)
    cos = num / np.maximum(den, 1e-12)
    return {"max_abs_diff": float(np.abs(got - want).max()), "cosine_mean": float(cos.mean()),
            "cosine_min": float(cos.min()), "cosine_p1": float(np.percentile(cos, 1))}


def check_numerics(onnx_path: str, reference: np.ndarray, images: np.ndarray, max_abs_diff: float = 1e-3,
                   min_cosine: float = 0.9999) -> dict:
    """Run ``onnx_path`` in ONNX Runtime on real ``images``; fail if it strays from the PyTorch ``reference``."""
    from export.runners import onnxruntime_runner

    got = onnxruntime_runner(onnx_path)(images)
    stats = compare_embeddings(got, reference)
    stats["images"] = int(len(images))
    if not np.isfinite(got).all() or stats["max_abs_diff"] > max_abs_diff or stats["cosine_min"] < min_cosine:
        raise NumericCheckError(
            f"{onnx_path}: ONNX Runtime output differs from PyTorch on {len(images)} real images: max abs diff "
            f"{stats['max_abs_diff']:.3g} (limit {max_abs_diff:g}), min cosine {stats['cosine_min']:.6f} "
            f"(limit {min_cosine:g})")
    log.info("ONNX Runtime vs PyTorch on %d images: max abs diff %.2e, min cosine %.7f", len(images),
             stats["max_abs_diff"], stats["cosine_min"])
    return stats
