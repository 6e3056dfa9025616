"""ibc-export refuses bad input early and clearly, and writes nothing: checkpoints, image folders,
backends, output paths, tolerances."""

from __future__ import annotations

import os

import pytest
from click.testing import CliRunner

from export.api import export_bundle, resolve_plan
from export.cli import main
from export.errors import BackendUnavailable, DataSetError, ExportError
from export.images import ImageSet, PreprocessedImages, folder_set
from export.parity import DEFAULT_TOLERANCES, parse_tolerance
from export.source import load_source
from export.tensorrt_export import tensorrt_status
from export_helpers import export_workspace
from models.checkpoint import CheckpointError
from sdk.preprocess import PreprocessConfig


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return export_workspace(tmp_path_factory)


def _run(args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _no_leftovers(parent):
    return [p for p in os.listdir(parent) if ".tmp-" in p]


# --------------------------------------------------------------------------- checkpoints


def test_missing_checkpoint_is_one_clear_line(tmp_path):
    res = _run([tmp_path / "nope.pt", "--out", tmp_path / "b"])
    assert res.exit_code == 1
    assert "nope.pt: no such checkpoint file" in res.output
    assert len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("content,needle", [
    (b"", "empty file"),
    (b"\x00garbage" * 100, "not a readable ibc checkpoint"),
])
def test_not_a_checkpoint(tmp_path, content, needle):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(content)
    with pytest.raises(CheckpointError, match=needle):
        load_source(str(bad))


def test_truncated_checkpoint(ws, tmp_path):
    data = ws["ckpt"].read_bytes()
    bad = tmp_path / "trunc.pt"
    bad.write_bytes(data[: len(data) // 2])
    res = _run([bad, "--out", tmp_path / "b"])
    assert res.exit_code == 1 and "trunc.pt" in res.output and "not a readable" in res.output
    assert not (tmp_path / "b").exists()


def test_checkpoint_of_another_model(ws, tmp_path):
    import torch

    ckpt = torch.load(ws["ckpt"], weights_only=True)
    ckpt["model_config"]["embed_dim"] = 64  # weights are 32-d
    bad = tmp_path / "other.pt"
    torch.save(ckpt, bad)
    with pytest.raises(CheckpointError, match="do not fit"):
        load_source(str(bad))


def test_plain_state_dict_is_not_a_checkpoint(tmp_path):
    import torch

    bad = tmp_path / "sd.pt"
    torch.save({"weight": torch.zeros(3)}, bad)
    with pytest.raises(CheckpointError, match="not an ibc checkpoint"):
        load_source(str(bad))


def test_source_drops_mpn_and_classifiers(ws):
    src = load_source(str(ws["ckpt"]))
    names = {n for n, _ in src.embedder.named_modules()}
    assert not any("mpn" in n or "classifier" in n for n in names)
    assert src.embedding_dim == 32 and src.image_size == 48


# --------------------------------------------------------------------------- image folders


def test_empty_folder(tmp_path):
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(DataSetError, match="holds no images"):
        folder_set(tmp_path / "empty", "calibration")


def test_parity_folder_without_classes(tmp_path, ws):
    flat = tmp_path / "flat"
    flat.mkdir()
    for f in sorted((ws["parity"] / "052").iterdir())[:3]:
        (flat / f.name).symlink_to(f.resolve())
    s = folder_set(flat, "parity")
    with pytest.raises(DataSetError, match="needs class labels"):
        s.require_labels()


def test_unreadable_images_are_named(tmp_path, ws):
    d = tmp_path / "bad" / "a"
    d.mkdir(parents=True)
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (d / "empty.png").write_bytes(b"")
    for f in sorted((ws["parity"] / "052").iterdir())[:2]:
        (d / f.name).symlink_to(f.resolve())
    s = folder_set(tmp_path / "bad", "parity")
    with pytest.raises(DataSetError, match=r"2 of 4 images unreadable.*broken\.jpg"):
        PreprocessedImages(s, PreprocessConfig(resize=40, crop=32), str(tmp_path), progress=False)


def test_unreadable_calibration_fails_the_export_before_writing(tmp_path, ws):
    cal = tmp_path / "cal"
    cal.mkdir()
    (cal / "x.jpg").write_bytes(b"nope")
    with pytest.raises(DataSetError, match="x.jpg"):
        export_bundle(str(ws["ckpt"]), str(tmp_path / "b"), backends="onnx", precisions="int8",
                      calib_data=str(cal), parity_data=str(ws["parity"]), progress=False)
    assert not (tmp_path / "b").exists() and not _no_leftovers(tmp_path)


def test_no_dataset_and_no_parity_folder(tmp_path, ws):
    with pytest.raises(DataSetError, match="--parity-data"):
        export_bundle(str(ws["ckpt"]), str(tmp_path / "b"), backends="onnx", precisions="fp32", progress=False)


# --------------------------------------------------------------------------- backends, output, options


def test_existing_output_is_refused(tmp_path, ws):
    out = tmp_path / "b"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    res = _run([ws["ckpt"], "--out", out, "--parity-data", ws["parity"]])
    assert res.exit_code == 1 and "already exists" in res.output and "--overwrite" in res.output
    assert (out / "keep.txt").read_text() == "old"


def test_unknown_backend_and_precision():
    with pytest.raises(ExportError, match="unknown backend 'coreml'"):
        resolve_plan("onnx,coreml", "fp32")
    with pytest.raises(ExportError, match="unknown precision 'int4'"):
        resolve_plan("onnx", "int4")


def test_plan_skips_unsupported_pairs():
    plan, skipped = resolve_plan("onnx,openvino", "fp32,fp16,int8")
    assert plan == [("onnxruntime", "fp32"), ("onnxruntime", "int8"), ("openvino", "fp32"), ("openvino", "fp16"),
                    ("openvino", "int8")]
    assert [n for n, _ in skipped] == ["onnxruntime-fp16"]
    with pytest.raises(ExportError, match="no variant to build"):
        resolve_plan("onnx", "fp16")


@pytest.mark.skipif(tensorrt_status()[0], reason="TensorRT is installed here")
def test_tensorrt_absent_says_so_in_one_line(tmp_path, ws):
    with pytest.raises(BackendUnavailable, match="tensorrt"):
        resolve_plan("tensorrt", "int8")
    res = _run([ws["ckpt"], "--out", tmp_path / "b", "--backend", "tensorrt", "--parity-data", ws["parity"]])
    assert res.exit_code == 1
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and "backend 'tensorrt' is not available" in lines[0]
    assert not (tmp_path / "b").exists()


def test_missing_python_backend_is_reported(monkeypatch):
    import importlib

    real = importlib.import_module

    def fake(name, *a, **k):
        if name == "openvino":
            raise ImportError("No module named 'openvino'")
        return real(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", fake)
    with pytest.raises(BackendUnavailable, match="'openvino' is not installed"):
        resolve_plan("openvino", "fp32")


def test_tolerance_parsing():
    assert parse_tolerance(None) == DEFAULT_TOLERANCES
    assert parse_tolerance(0.3)["int8"] == 0.3
    t = parse_tolerance("int8=0.2,fp16=0.05")
    assert t["int8"] == 0.2 and t["fp16"] == 0.05 and t["fp32"] == DEFAULT_TOLERANCES["fp32"]
    assert parse_tolerance("0.7")["int8"] == 0.7
    with pytest.raises(ValueError, match="unknown precision"):
        parse_tolerance("int4=1")
    with pytest.raises(ValueError, match="not a number"):
        parse_tolerance("int8=abc")


def test_bad_tolerance_on_cli(tmp_path, ws):
    res = _run([ws["ckpt"], "--out", tmp_path / "b", "--tolerance", "int8=lots", "--parity-data", ws["parity"]])
    assert res.exit_code == 1 and "not a number" in res.output


def test_image_set_without_drops_listed_paths_and_says_so():
    import numpy as np

    s = ImageSet("validation", ["a", "b", "c", "d"], np.array([0, 0, 1, 1]), "val split")
    out = s.without(["b", "d", "zz"], "calibration images")
    assert out.paths == ["a", "c"] and out.labels.tolist() == [0, 1]
    assert out.origin == "val split, minus the 2 calibration images"
    assert s.without(["zz"], "calibration images") is s  # nothing to drop: the same set
    unlabelled = ImageSet("validation", ["a", "b"], None, "folder")
    assert unlabelled.without(["a"], "calibration images").labels is None  # the clear 'needs labels' error comes later
