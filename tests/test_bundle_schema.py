"""sdk.bundle: manifest round trip, schema/version/hash refusal, atomic directory replacement."""

import json

import pytest

from sdk.bundle import (
    BundleError,
    FileEntry,
    Manifest,
    Variant,
    atomic_directory,
    file_entry,
    load_manifest,
    write_manifest,
)
from sdk.preprocess import PreprocessConfig


def _bundle(path, payload=b"model-bytes"):
    with atomic_directory(path, overwrite=True) as tmp:
        (tmp_model := __import__("pathlib").Path(tmp) / "onnx").mkdir()
        (tmp_model / "model.onnx").write_bytes(payload)
        v = Variant(name="onnxruntime-fp32", backend="onnxruntime", precision="fp32",
                    files=[file_entry(tmp, "onnx/model.onnx")], passed=True)
        write_manifest(tmp, Manifest(embedding_dim=8, preprocess=PreprocessConfig(resize=64, crop=56), variants=[v]))
    return path


def test_round_trip_and_digest(tmp_path):
    b = _bundle(tmp_path / "b")
    m = load_manifest(b)
    assert m.embedding_dim == 8 and m.preprocess.crop == 56
    assert m.variant("onnxruntime-fp32").main_file.bytes == len(b"model-bytes")
    assert Manifest.from_dict(m.to_dict()).digest() == m.digest()
    with pytest.raises(BundleError, match="no variant"):
        m.variant("openvino-int8")


def test_tampered_file_is_refused(tmp_path):
    b = _bundle(tmp_path / "b")
    (b / "onnx" / "model.onnx").write_bytes(b"model-bytez")
    with pytest.raises(BundleError, match="model.onnx.*SHA-256"):
        load_manifest(b)
    (b / "onnx" / "model.onnx").unlink()
    with pytest.raises(BundleError, match="missing"):
        load_manifest(b)


def test_schema_problems_are_named(tmp_path):
    b = _bundle(tmp_path / "b")
    data = json.loads((b / "manifest.json").read_text())
    data["schema_version"] = 99
    (b / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match="schema version 99"):
        load_manifest(b)
    (b / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="unreadable manifest"):
        load_manifest(b)
    (b / "manifest.json").unlink()
    with pytest.raises(BundleError, match="no manifest.json"):
        load_manifest(b)
    with pytest.raises(BundleError, match="no such bundle"):
        load_manifest(tmp_path / "nope")
    bad = {"format": "ibc-bundle", "schema_version": 1, "variants": [{"name": "x"}]}
    with pytest.raises(BundleError, match="malformed"):
        Manifest.from_dict(bad)
    escaping = Variant("v", "onnxruntime", "fp32", [FileEntry("../secret", "0", 1)])
    m = Manifest(embedding_dim=8, preprocess=PreprocessConfig(), variants=[escaping])
    (tmp_path / "c").mkdir()
    write_manifest(tmp_path / "c", m)
    with pytest.raises(BundleError, match="outside the bundle"):
        load_manifest(tmp_path / "c")


def test_atomic_directory_keeps_old_bundle_on_failure(tmp_path):
    b = _bundle(tmp_path / "b")
    before = (b / "manifest.json").read_text()
    with pytest.raises(RuntimeError):
        with atomic_directory(b, overwrite=True) as tmp:
            (__import__("pathlib").Path(tmp) / "half").write_text("x")
            raise RuntimeError("crash mid-write")
    assert (b / "manifest.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no temp leftovers
    with pytest.raises(FileExistsError, match="already exists"):
        with atomic_directory(b):
            pass
    _bundle(b, payload=b"new")  # overwrite replaces it whole
    assert load_manifest(b).variants[0].main_file.bytes == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
