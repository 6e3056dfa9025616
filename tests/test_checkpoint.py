"""models.checkpoint: atomic writes, safe loads, and clear refusals of foreign or broken files."""

import pickle

import pytest
import torch

from models import IBCModel, ModelConfig
from models.checkpoint import (
    CheckpointError,
    check_architecture,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)


def _model(**kw):
    return IBCModel(ModelConfig(backbone="resnet18", embed_dim=16, num_classes=3, **kw))


def _save(path, model, **extra):
    return save_checkpoint(path, {"model_config": model.config.to_dict(), "model": model.state_dict(), **extra})


def test_round_trip_rebuilds_identical_model(tmp_path):
    m = _model().eval()
    _save(tmp_path / "c.pt", m, epoch=3)
    ckpt = load_checkpoint(tmp_path / "c.pt")
    assert ckpt["epoch"] == 3 and ckpt["format"] == "ibc-checkpoint"
    assert (tmp_path / "c.pt").stat().st_mode & 0o044  # readable by others, like any saved file
    m2 = model_from_checkpoint(ckpt)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(m2.inference_embedder()(x), m.inference_embedder()(x))


def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    m = _model()
    path = _save(tmp_path / "last.pt", m, epoch=1)
    before = (tmp_path / "last.pt").read_bytes()

    def disk_full(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space"):
        _save(path, m, epoch=2)
    assert (tmp_path / "last.pt").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # temp file cleaned up


def test_broken_and_foreign_files_are_refused(tmp_path):
    m = _model()
    good = _save(tmp_path / "good.pt", m)
    data = open(good, "rb").read()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.pt").write_bytes(b"")
    torch.save({"state_dict": m.state_dict()}, tmp_path / "plain.pt")
    (tmp_path / "evil.pt").write_bytes(pickle.dumps(print))
    cases = {
        "trunc.pt": "not a readable ibc checkpoint",
        "empty.pt": "empty file",
        "plain.pt": "not an ibc checkpoint",
        "evil.pt": "not a readable ibc checkpoint",
        "missing.pt": "no such checkpoint",
    }
    for name, msg in cases.items():
        with pytest.raises(CheckpointError, match=msg) as info:
            load_checkpoint(tmp_path / name)
        assert name in str(info.value)


def test_newer_format_and_other_architecture(tmp_path):
    m = _model()
    torch.save({"format": "ibc-checkpoint", "version": 99, "model_config": {}, "model": {}}, tmp_path / "new.pt")
    with pytest.raises(CheckpointError, match="version 99 is newer"):
        load_checkpoint(tmp_path / "new.pt")
    ckpt = load_checkpoint(_save(tmp_path / "c.pt", m))
    with pytest.raises(CheckpointError, match="backbone: checkpoint 'resnet18' vs expected 'resnet34'"):
        check_architecture(ckpt, ModelConfig(backbone="resnet34", embed_dim=16, num_classes=3))
    ckpt["model"]["head.fc.weight"] = torch.zeros(8, 512)
    with pytest.raises(CheckpointError, match="shape mismatch in head.fc.weight"):
        model_from_checkpoint(ckpt)
    del ckpt["model"]["head.fc.bias"]
    with pytest.raises(CheckpointError, match="missing 1"):
        model_from_checkpoint(ckpt)


def test_library_versions_survive_weights_only_load(tmp_path):
    from models.checkpoint import library_versions

    m = _model()
    _save(tmp_path / "v.pt", m, versions=library_versions())
    assert load_checkpoint(tmp_path / "v.pt")["versions"]["torch"] == str(torch.__version__)
