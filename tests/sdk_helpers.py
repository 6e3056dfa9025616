"""Test helpers for the SDK: a tiny but real bundle (ONNX + OpenVINO IR) and synthetic images.

The network is conv(3x3, stride 2) -> ReLU -> global max pool -> matmul -> L2 normalise, with a
dynamic batch and the input name/shape of :class:`sdk.bundle.InputSpec`: small enough to build
in milliseconds, real enough that every runtime parses and runs it, and a numpy reference
(:func:`reference_embed`) computes the same function for honest comparisons.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from sdk.bundle import InputSpec, Manifest, Variant, atomic_directory, file_entry, write_manifest
from sdk.preprocess import PreprocessConfig, preprocess_batch

CROP, RESIZE, CHANNELS = 32, 36, 24


def tiny_weights(dim: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "conv_w": (rng.standard_normal((CHANNELS, 3, 3, 3)) * 0.3).astype(np.float32),
        "conv_b": (rng.standard_normal(CHANNELS) * 0.1).astype(np.float32),
        "fc_w": (rng.standard_normal((CHANNELS, dim)) * 0.3).astype(np.float32),
        "fc_b": (rng.standard_normal(dim) * 0.1).astype(np.float32),
    }


def tiny_onnx(path: str | os.PathLike, dim: int = 16, seed: int = 0, input_name: str = "images",
              output_name: str = "embeddings") -> str:
    """Write the tiny embedding network as ONNX (opset 17) and return its path."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = tiny_weights(dim, seed)
    inits = [numpy_helper.from_array(v, k) for k, v in w.items()]
    inits.append(numpy_helper.from_array(np.array([1], np.int64), "axes1"))
    inits.append(numpy_helper.from_array(np.array(1e-12, np.float32), "eps"))
    nodes = [
        helper.make_node("Conv", [input_name, "conv_w", "conv_b"], ["c"], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalMaxPool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"], axis=1),
        helper.make_node("MatMul", ["f", "fc_w"], ["m"]),
        helper.make_node("Add", ["m", "fc_b"], ["e"]),
        helper.make_node("Mul", ["e", "e"], ["sq"]),
        helper.make_node("ReduceSum", ["sq", "axes1"], ["ss"], keepdims=1),
        helper.make_node("Add", ["ss", "eps"], ["sse"]),
        helper.make_node("Sqrt", ["sse"], ["norm"]),
        helper.make_node("Div", ["e", "norm"], [output_name]),
    ]
    graph = helper.make_graph(
        nodes, "tiny_embedder",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["batch", 3, CROP, CROP])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["batch", dim])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="ibc-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, os.fspath(path))
    return os.fspath(path)


def reference_embed(batch: np.ndarray, dim: int = 16, seed: int = 0) -> np.ndarray:
    """The tiny network in numpy (float64), for checking the runtimes."""
    w = tiny_weights(dim, seed)
    x = np.pad(batch.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    n, _, h, wd = batch.shape
    oh, ow = (h + 2 - 3) // 2 + 1, (wd + 2 - 3) // 2 + 1
    patches = np.stack([x[:, :, i:i + 2 * oh:2, j:j + 2 * ow:2] for i in range(3) for j in range(3)], axis=2)
    kernel = w["conv_w"].reshape(CHANNELS, 3, 9).astype(np.float64)
    conv = np.einsum("nckhw,ock->nohw", patches, kernel) + w["conv_b"][None, :, None, None]
    pooled = np.maximum(conv, 0).max(axis=(2, 3))
    e = pooled @ w["fc_w"] + w["fc_b"]
    return e / np.sqrt((e ** 2).sum(1, keepdims=True) + 1e-12)


def make_bundle(out_dir: str | os.PathLike, dim: int = 16, seed: int = 0, openvino: bool = True,
                int8_passed: bool | None = None, parity_extra: dict | None = None,
                int8_build: dict | None = None) -> Path:
    """Write a valid bundle: onnxruntime-fp32 (+ openvino-fp32 IR; + a fake-int8 ONNX variant).

    ``int8_passed`` adds an "onnxruntime-int8" variant (the same fp32 graph, standing in for a
    quantised one) whose parity gate passed or failed, to test variant selection.
    """
    out_dir = Path(out_dir)
    pre = PreprocessConfig(resize=RESIZE, crop=CROP)
    with atomic_directory(out_dir, overwrite=True) as tmp:
        os.makedirs(os.path.join(tmp, "onnx"))
        tiny_onnx(os.path.join(tmp, "onnx", "model_fp32.onnx"), dim, seed)
        variants = [Variant("onnxruntime-fp32", "onnxruntime", "fp32", [file_entry(tmp, "onnx/model_fp32.onnx")],
                            parity={"recall@1": 0.5, **(parity_extra or {})}, passed=True)]
        if int8_passed is not None:
            tiny_onnx(os.path.join(tmp, "onnx", "model_int8.onnx"), dim, seed)
            variants.append(Variant("onnxruntime-int8", "onnxruntime", "int8",
                                    [file_entry(tmp, "onnx/model_int8.onnx")],
                                    parity={"recall@1": 0.49 if int8_passed else 0.3,
                                            **({"build": int8_build} if int8_build else {})},
                                    passed=int8_passed))
        if openvino:
            import openvino as ov

            os.makedirs(os.path.join(tmp, "openvino"))
            xml = os.path.join(tmp, "openvino", "model_fp32.xml")
            ov.save_model(ov.convert_model(os.path.join(tmp, "onnx", "model_fp32.onnx")), xml, compress_to_fp16=False)
            variants.append(Variant("openvino-fp32", "openvino", "fp32",
                                    [file_entry(tmp, "openvino/model_fp32.xml"),
                                     file_entry(tmp, "openvino/model_fp32.bin")],
                                    runtime_hints={"INFERENCE_PRECISION_HINT": "f32"},
                                    parity={"recall@1": 0.5}, passed=True))
        manifest = Manifest(embedding_dim=dim, preprocess=pre, variants=variants,
                            input=InputSpec(shape=[-1, 3, CROP, CROP]),
                            parity={"dataset": "synthetic", "tolerance": 0.01},
                            provenance={"seed": seed, "made_by": "tests/sdk_helpers.py"})
        write_manifest(tmp, manifest)
    return out_dir


def synthetic_image(seed: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    """A random blocky RGB image: distinct per seed, so its embedding is too."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.Resampling.NEAREST)


def write_images(folder: str | os.PathLike, n: int, start: int = 0, ext: str = "png") -> list[Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + n):
        p = folder / f"img_{i:03d}.{ext}"
        synthetic_image(i).save(p)
        paths.append(p)
    return paths


def reference_for_images(images, dim: int = 16, seed: int = 0) -> np.ndarray:
    return reference_embed(preprocess_batch(images, PreprocessConfig(resize=RESIZE, crop=CROP)), dim, seed)
