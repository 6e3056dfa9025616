"""The export steps on their own: the ONNX contract and numeric check, node selection for float
layers, and OpenVINO int8 leaving the head output and the L2-normalisation unquantized."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from export.errors import ExportError, NumericCheckError
from export.onnx_export import check_numerics, check_onnx
from export.ort_quantize import OrtInt8Options, quantize_int8, resolve_nodes
from export.runners import onnxruntime_runner
from export_helpers import DIM, exported_onnx


@pytest.fixture(scope="module")
def m(tmp_path_factory):
    return exported_onnx(tmp_path_factory)


def test_onnx_contract_and_dynamic_batch(m):
    model = check_onnx(m["fp32"], DIM, 48)
    assert model.graph.input[0].name == "images"
    run = onnxruntime_runner(m["fp32"])
    for n in (1, 5):
        out = run(m["parity"].first(n))
        assert out.shape == (n, DIM)
    with pytest.raises(ExportError, match="expected \\[batch, 3, 64, 64\\]"):
        check_onnx(m["fp32"], DIM, 64)


def test_numeric_check_passes_and_fails(m):
    n = 8
    stats = check_numerics(m["fp32"], m["ref"][:n], m["parity"].first(n))
    assert stats["max_abs_diff"] < 1e-4 and stats["cosine_min"] > 0.99999
    wrong = np.roll(m["ref"][:n], 1, axis=0)  # another image's embedding: as if the export were broken
    with pytest.raises(NumericCheckError, match="differs from PyTorch"):
        check_numerics(m["fp32"], wrong, m["parity"].first(n))


def test_keep_float_node_selection(m):
    model = onnx.load(m["fp32"])
    head = resolve_nodes(model, ["head"])
    assert head and all(n.op_type in ("Gemm", "MatMul") for n in model.graph.node if n.name in head)
    convs = resolve_nodes(model, ["node_Conv_*"])
    assert len(convs) >= 10
    with pytest.raises(ExportError, match="matches no node"):
        resolve_nodes(model, ["no_such_node"])


def test_ort_int8_excludes_named_nodes(m, tmp_path):
    model = onnx.load(m["fp32"])
    first_conv = next(n.name for n in model.graph.node if n.op_type == "Conv")
    out = str(tmp_path / "q.onnx")
    summary = quantize_int8(m["fp32"], out, m["calib"], OrtInt8Options(keep_float=(first_conv, "head")),
                            workdir=str(tmp_path), progress=False)
    assert first_conv in summary["kept_float_nodes"]
    q = onnx.load(out)
    conv = next(n for n in q.graph.node if n.name == first_conv)
    assert conv.input[0] == "images"  # no QuantizeLinear/DequantizeLinear in front of it
    assert onnxruntime_runner(out)(m["parity"].first(4)).shape == (4, DIM)


def test_openvino_int8_never_quantizes_the_normalisation(m):
    from export import openvino_export as ovx

    model = ovx.convert(m["fp32"])
    head, tail = ovx.head_and_tail(model)
    assert len(head) == 1 and tail
    opts = ovx.OvInt8Options(accuracy_control=False, subset_size=8, fast_bias_correction=True)
    q, summary = ovx.quantize_int8(model, m["calib"], None, opts)
    assert summary["fake_quantize_nodes"] > 10
    fq_consumers = {t.get_node().get_friendly_name() for op in q.get_ops() if op.get_type_name() == "FakeQuantize"
                    for t in op.output(0).get_target_inputs()}
    assert not fq_consumers & set(tail)
    from export.runners import openvino_runner

    emb = openvino_runner(q, ovx.runtime_hints("int8"))(m["parity"].first(16))
    assert np.abs(np.linalg.norm(emb, axis=1) - 1).max() < 1e-4
    assert (emb * m["ref"][:16]).sum(1).mean() > 0.95
