"""End to end: a tiny real checkpoint -> bundle with ONNX Runtime and OpenVINO variants, read back
by the SDK; the parity gate rejects a deliberately broken int8 variant and nothing failing is
written; a crash leaves no bundle behind."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from export.api import export_bundle
from export.cli import main
from export.errors import ExportError, GateFailure
from export.openvino_export import OvInt8Options
from export.ort_quantize import OrtInt8Options
from export_helpers import (TEST_CLASSES, export_workspace, make_checkpoint, near_duplicates, reference_embeddings,
                            solid_images)
from sdk.bundle import load_manifest

LENIENT = "int8=15,fp16=5,bf16=10,fp32=0.1"  # 48 parity images: one query is 2 points
PLAIN_ORT = OrtInt8Options(accuracy_control=False)  # the gate on its own (accuracy control: test_ort_accuracy_control)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return export_workspace(tmp_path_factory)


@pytest.fixture(scope="module")
def bundle(ws):
    """One full export (CLI) shared by the tests below."""
    out = ws["root"] / "model.ibc"
    if not out.exists():
        res = CliRunner().invoke(main, [
            str(ws["ckpt"]), "--out", str(out), "--backend", "onnx,openvino", "--precision", "fp32,fp16,int8",
            "--calib-data", str(ws["calib"]), "--parity-data", str(ws["parity"]), "--val-data", str(ws["val"]),
            "--tolerance", LENIENT, "--ks", "1,2,4", "--ov-keep-float", "head", "--ov-max-drop", "30",
            "--ort-max-drop", "30", "-q"])
        assert res.exit_code == 0, res.output
        assert "onnxruntime-int8" in res.output and "openvino-int8" in res.output and "R@4" in res.output
    return out


def test_bundle_layout_and_manifest(bundle):
    m = load_manifest(str(bundle))  # the SDK's reader, with hash verification
    names = [v.name for v in m.variants]
    assert names == ["onnxruntime-fp32", "onnxruntime-int8", "openvino-fp32", "openvino-fp16", "openvino-int8"]
    assert m.embedding_dim == 32 and m.normalized
    assert m.input.name == "images" and m.input.shape == [-1, 3, 48, 48] and m.output_name == "embeddings"
    assert m.preprocess.crop == 48
    hints = {v.name: v.runtime_hints for v in m.variants}
    assert hints["openvino-fp32"] == {"INFERENCE_PRECISION_HINT": "f32"}
    assert hints["openvino-fp16"] == {"INFERENCE_PRECISION_HINT": "f16"}
    assert hints["openvino-int8"] == {"INFERENCE_PRECISION_HINT": "f32"}
    for v in m.variants:
        assert v.passed and v.parity["passed"]
        assert {"recall@1", "recall@2", "recall@4", "map@r"} <= set(v.parity["metrics"])
        assert 0.9 < v.parity["cosine_mean"] <= 1.0 + 1e-6 and "cosine_p1" in v.parity
        assert v.parity["norm_max_deviation"] < 0.02
        for f in v.files:
            assert len(f.sha256) == 64 and f.bytes > 0
    assert m.parity["reference"]["name"] == "pytorch-fp32"
    assert m.parity["ks"] == [1, 2, 4] and m.parity["tolerances"]["int8"] == 15
    assert m.parity["onnx_vs_pytorch"]["max_abs_diff"] < 1e-4
    prov = m.provenance
    assert len(prov["checkpoint"]["sha256"]) == 64 and prov["versions"]["onnxruntime"]
    assert prov["config"]["preprocess"]["crop"] == 48 and "not built in this project's CI" in prov["tensorrt"]
    # fp16 IR is about half the fp32 one; int8 much smaller
    size = {v.name: sum(f.bytes for f in v.files) for v in m.variants}
    assert size["openvino-fp16"] < 0.6 * size["openvino-fp32"]
    assert size["onnxruntime-int8"] < 0.5 * size["onnxruntime-fp32"]
    assert not [p for p in os.listdir(bundle.parent) if ".tmp-" in p]
    q = {v.name: v.parity["build"].get("quantization", {}) for v in m.variants}
    assert q["openvino-int8"]["fake_quantize_nodes"] > 10 and q["openvino-int8"]["validation_images"] == 24
    assert q["onnxruntime-int8"]["kept_float_nodes"]


def test_onnx_file_contract(bundle):
    model = onnx.load(str(bundle / "onnx" / "model.fp32.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    (inp,), (outp,) = model.graph.input, model.graph.output
    assert inp.name == "images" and outp.name == "embeddings"
    assert inp.type.tensor_type.shape.dim[0].dim_param  # dynamic batch
    q = onnx.load(str(bundle / "onnx" / "model.int8.onnx"))
    ops = [n.op_type for n in q.graph.node]
    assert ops.count("QuantizeLinear") > 10 and "DequantizeLinear" in ops
    gemm = [n for n in q.graph.node if n.op_type == "Gemm"]
    assert gemm, "the ONNX Runtime default keeps the embedding head a float Gemm"


def test_sdk_embeddings_match_pytorch(bundle, ws):
    from sdk.retriever import Retriever

    files = [f for c in TEST_CLASSES[:2] for f in sorted((ws["parity"] / c).iterdir())[:3]]
    ref = reference_embeddings(ws["ckpt"], files)
    for variant, min_cos in [("onnxruntime-fp32", 0.99999), ("openvino-fp32", 0.99999), ("openvino-fp16", 0.999),
                             ("openvino-int8", 0.95), ("onnxruntime-int8", 0.95)]:
        backend, precision = variant.split("-")
        r = Retriever.from_bundle(str(bundle), backend=backend, precision=precision)
        emb = np.asarray(r.embed([str(f) for f in files]))
        cos = (emb * ref).sum(1)
        assert cos.min() > min_cos, (variant, cos.min())
        assert np.abs(np.linalg.norm(emb, axis=1) - 1).max() < 1e-2, variant  # the bundle promises unit vectors


def test_gate_rejects_broken_calibration_and_writes_nothing_failing(ws, tmp_path):
    """int8 calibrated on flat single-colour images saturates on real ones: the gate must catch it.
    Parity images are near-duplicates, where the fp32 reference is perfect (see near_duplicates)."""
    flat = solid_images(tmp_path / "flat")
    parity = near_duplicates(tmp_path / "near-dup")
    out = tmp_path / "b.ibc"
    with pytest.raises(GateFailure) as info:
        export_bundle(str(ws["ckpt"]), str(out), backends="onnx", precisions="fp32,int8", calib_data=str(flat),
                      parity_data=str(parity), tolerance=0.5, ks=(1, 2), progress=False, ort_int8=PLAIN_ORT)
    err = info.value
    assert [v.name for v in err.failed] == ["onnxruntime-int8"]
    assert "onnxruntime-int8" in str(err) and "drop" in str(err)
    result = err.result
    assert result.written == ["onnxruntime-fp32"] and result.rejected == ["onnxruntime-int8"]
    m = load_manifest(str(out))
    assert [v.name for v in m.variants] == ["onnxruntime-fp32"]
    assert not (out / "onnx" / "model.int8.onnx").exists()
    assert [r["name"] for r in m.parity["rejected"]] == ["onnxruntime-int8"]
    assert m.parity["rejected"][0]["recall1_drop"] > 0.5

    # only failing variants requested: nothing at all is written, an existing bundle stays as it was
    out2 = tmp_path / "only-int8.ibc"
    with pytest.raises(GateFailure, match="nothing was written"):
        export_bundle(str(ws["ckpt"]), str(out2), backends="onnx", precisions="int8", calib_data=str(flat),
                      parity_data=str(parity), tolerance=0.5, progress=False, ort_int8=PLAIN_ORT)
    assert not out2.exists()
    before = (out / "manifest.json").read_bytes()
    with pytest.raises(GateFailure):
        export_bundle(str(ws["ckpt"]), str(out), backends="onnx", precisions="int8", calib_data=str(flat),
                      parity_data=str(parity), tolerance=0.5, overwrite=True, progress=False, ort_int8=PLAIN_ORT)
    assert (out / "manifest.json").read_bytes() == before
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p or ".old-" in p]

    # --allow-drop keeps it, marked as failed
    out3 = tmp_path / "allow.ibc"
    res = export_bundle(str(ws["ckpt"]), str(out3), backends="onnx", precisions="int8", calib_data=str(flat),
                        parity_data=str(parity), tolerance=0.5, allow_drop=True, progress=False,
                        ort_int8=PLAIN_ORT)
    (v,) = load_manifest(str(out3)).variants
    assert v.name == "onnxruntime-int8" and not v.passed and "FAILED the parity gate" in v.notes
    assert res.failed and res.written == ["onnxruntime-int8"]


def test_cli_gate_failure_exit_code_and_table(ws, tmp_path):
    flat = solid_images(tmp_path / "flat")
    parity = near_duplicates(tmp_path / "near-dup")
    res = CliRunner().invoke(main, [str(ws["ckpt"]), "--out", str(tmp_path / "b"), "--backend", "onnx",
                                    "--precision", "int8", "--calib-data", str(flat), "--parity-data",
                                    str(parity), "--no-ort-accuracy-control", "-q"])
    assert res.exit_code == 3
    assert "FAIL" in res.output and "parity gate failed for onnxruntime-int8" in res.output
    assert not (tmp_path / "b").exists()
    assert res.output.strip().splitlines()[-1] == "no variant passed its parity gate: no bundle was written"


def test_cli_gate_failure_last_line_names_the_shipped_variants(ws, tmp_path):
    flat = solid_images(tmp_path / "flat")
    parity = near_duplicates(tmp_path / "near-dup")
    res = CliRunner().invoke(main, [str(ws["ckpt"]), "--out", str(tmp_path / "b"), "--backend", "onnx",
                                    "--precision", "fp32,int8", "--calib-data", str(flat), "--parity-data",
                                    str(parity), "--no-ort-accuracy-control", "-q"])
    assert res.exit_code == 3
    assert res.output.strip().splitlines()[-1] == (
        f"the bundle {tmp_path / 'b'} was written with the passing variants: onnxruntime-fp32 "
        "(left out: onnxruntime-int8)")


def test_crash_mid_export_leaves_old_bundle(ws, tmp_path, monkeypatch):
    out = tmp_path / "b.ibc"
    out.mkdir()
    (out / "manifest.json").write_text("{\"old\": true}")
    from export import api

    def boom(self, name, precision):
        raise ExportError("simulated crash while building openvino")

    monkeypatch.setattr(api._Builder, "_openvino", boom)
    with pytest.raises(ExportError, match="simulated crash"):
        export_bundle(str(ws["ckpt"]), str(out), backends="onnx,openvino", precisions="fp32",
                      parity_data=str(ws["parity"]), overwrite=True, progress=False)
    assert json.loads((out / "manifest.json").read_text()) == {"old": True}
    assert sorted(os.listdir(tmp_path)) == ["b.ibc"]


def test_checkpoint_dataset_splits_are_used(ws, tmp_path):
    """Without folders, calibration / validation / parity come from the checkpoint's own dataset."""
    root = tmp_path / "data"
    from export_helpers import TRAIN_CLASSES, link_classes

    link_classes(root, TRAIN_CLASSES + TEST_CLASSES[:4], 4)
    ckpt = make_checkpoint(tmp_path / "with-data.pt", data_root=root)
    pytest.importorskip("trainer.data")
    res = export_bundle(str(ckpt), str(tmp_path / "b"), backends="openvino", precisions="int8",
                        tolerance="int8=100", ks=(1,), calib_size=8, progress=False,
                        ov_int8=OvInt8Options(subset_size=8, max_drop=100.0, fast_bias_correction=True))
    m = res.manifest
    assert "test split" in m.parity["dataset"]["origin"] and m.parity["dataset"]["classes"] == 4
    assert "val split" in m.parity["validation_set"]["origin"]
    assert "train split" in m.provenance["calibration"]["origin"]
