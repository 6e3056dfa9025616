"""The TensorRT path. Engines are built only where ``tensorrt`` and a CUDA GPU exist (never in CI
here); the ONNX files the engines are built from are checked everywhere, through ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from export.runners import onnxruntime_runner
from export.tensorrt_export import fp16_onnx, qdq_onnx, tensorrt_status
from export_helpers import export_workspace, exported_onnx

HAS_TRT, WHY_NOT = tensorrt_status()
needs_trt = pytest.mark.skipif(not HAS_TRT, reason=f"TensorRT engines need tensorrt + CUDA: {WHY_NOT}")


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory):
    return exported_onnx(tmp_path_factory)


def test_qdq_onnx_is_symmetric_int8_and_runs_in_onnxruntime(onnx_model):
    out = str(onnx_model["work"] / "model.qdq.onnx")
    summary = qdq_onnx(onnx_model["fp32"], out, onnx_model["calib"], calibrate_method="minmax",
                       workdir=str(onnx_model["work"]), progress=False)
    assert summary["quantize_linear_nodes"] > 10
    model = onnx.load(out)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    zero_points = [inits[n.input[2]] for n in model.graph.node
                   if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2]
    # TensorRT's explicit quantization: int8 with zero points 0 everywhere, biases left float (no int32 DQ)
    assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points)
    emb = onnxruntime_runner(out)(onnx_model["parity"].first(len(onnx_model["parity"])))
    cos = (emb * onnx_model["ref"]).sum(1)
    assert cos.mean() > 0.97, cos.mean()


def test_fp16_onnx_keeps_float_io_and_runs_in_onnxruntime(onnx_model):
    out = fp16_onnx(onnx_model["fp32"], str(onnx_model["work"] / "model.fp16.onnx"))
    model = onnx.load(out)
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    emb = onnxruntime_runner(out)(onnx_model["parity"].first(8))
    assert (emb * onnx_model["ref"][:8]).sum(1).min() > 0.999


@needs_trt
@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_engine_builds_and_matches(onnx_model, precision):
    from export.runners import tensorrt_runner
    from export.tensorrt_export import build_engine

    work = onnx_model["work"]
    if precision == "int8":
        src = str(work / "model.qdq.onnx")
        qdq_onnx(onnx_model["fp32"], src, onnx_model["calib"], workdir=str(work), progress=False)
    else:
        src = fp16_onnx(onnx_model["fp32"], str(work / "model.fp16.onnx"))
    engine = str(work / f"model.{precision}.plan")
    info = build_engine(src, engine, precision)
    assert info["strongly_typed"]
    emb = tensorrt_runner(engine, precision=precision)(onnx_model["parity"].first(len(onnx_model["parity"])))
    assert (emb * onnx_model["ref"]).sum(1).mean() > (0.999 if precision == "fp16" else 0.97)


@needs_trt
@pytest.mark.gpu
def test_tensorrt_bundle(tmp_path_factory):
    from export.api import export_bundle
    from sdk.bundle import load_manifest

    ws = export_workspace(tmp_path_factory)
    out = tmp_path_factory.mktemp("trt-bundle") / "b"
    export_bundle(str(ws["ckpt"]), str(out), backends="tensorrt", precisions="fp16,int8", calib_data=str(ws["calib"]),
                  parity_data=str(ws["parity"]), tolerance="int8=15,fp16=5", progress=False)
    m = load_manifest(str(out))
    assert [v.name for v in m.variants] == ["tensorrt-fp16", "tensorrt-int8"]
    assert all("not built in this project's CI" in v.notes for v in m.variants)
