"""Trainer building blocks: config, data splits, losses, LR schedule, augmentation, evaluation path."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from _trainer_helpers import make_image_folder, register_tiny_backbones, tiny_config  # noqa: E402

from trainer.config import Config, ConfigError, OptimConfig, load_config, parse_override  # noqa: E402
from trainer.data import DataError, dataset_items, split_classes, training_classes  # noqa: E402
from trainer.losses import ibc_loss, smoothed_cross_entropy  # noqa: E402
from trainer.loop import lr_factor  # noqa: E402

register_tiny_backbones()


# --------------------------------------------------------------------------- losses


@pytest.mark.parametrize("eps,t", [(0.0, 1.0), (0.1, 0.2), (0.3, 0.605)])
def test_smoothed_ce_matches_torch(eps, t):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(12, 7, generator=g, requires_grad=True)
    y = torch.randint(0, 7, (12,), generator=g)
    ours = smoothed_cross_entropy(logits, y, eps, t)
    ref = F.cross_entropy(logits / t, y, label_smoothing=eps)
    torch.testing.assert_close(ours, ref)
    (ga,) = torch.autograd.grad(ours, logits)
    (gb,) = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(ga, gb)


def test_ibc_loss_weights_and_ablation():
    logits, mlog = torch.randn(6, 4), torch.randn(6, 4)
    y = torch.tensor([0, 0, 1, 1, 2, 3])
    full = ibc_loss(logits, y, mlog, temperature=0.5, smoothing=0.1, backbone_weight=0.5, mpn_weight=2.0)
    torch.testing.assert_close(full["loss"], 0.5 * full["loss_backbone"] + 2.0 * full["loss_mpn"])
    ce_only = ibc_loss(logits, y, None, temperature=0.5, smoothing=0.1)
    assert "loss_mpn" not in ce_only
    torch.testing.assert_close(ce_only["loss"], ce_only["loss_backbone"])


# --------------------------------------------------------------------------- config


def test_config_yaml_overrides_and_errors(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("optim: {lr: 1e-3}\nmodel: {backbone: resnet18, mpn: {num_heads: 4}}\n")
    cfg = load_config(str(p), ["optim.epochs=3", "loss.temperature=0.5", "model.use_mpn=false"])
    assert cfg.optim.lr == 1e-3 and cfg.optim.epochs == 3 and cfg.loss.temperature == 0.5
    assert cfg.model.backbone == "resnet18" and cfg.model.mpn.num_heads == 4 and not cfg.model.use_mpn
    d = cfg.to_dict()
    assert Config.from_dict(d).to_dict() == d  # round trip
    assert d["preprocess"]["crop"] == 227 and isinstance(d["preprocess"]["mean"], list)
    with pytest.raises(ConfigError, match="optim.lrr"):
        load_config(None, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="expected an integer"):
        load_config(None, ["optim.epochs=many"])
    with pytest.raises(ConfigError, match="select_on"):
        load_config(None, ["data.select_on=train"])
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("optim.lr")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))


def test_all_presets_load():
    presets = sorted((ROOT / "configs").glob("*.yaml"))
    names = {p.stem for p in presets}
    assert {"cub", "cars", "sop", "inshop", "flowers102-cpu", "omniglot-cpu"} <= names
    for p in presets:
        cfg = load_config(str(p))
        assert cfg.optim.lr > 0, p
    cub = load_config(str(ROOT / "configs" / "cub.yaml"))
    assert (cub.sampler.classes_per_batch, cub.sampler.images_per_class, cub.loss.temperature) == (6, 9, 0.2)
    assert cub.model.backbone == "resnet50" and cub.model.pooling == "max" and cub.optim.milestones == [30]


def test_lr_schedule():
    step = OptimConfig(lr=1.0, epochs=10, schedule="step", milestones=[3, 6], gamma=0.1)
    assert lr_factor(step, 0, 0, 10) == 1.0
    assert lr_factor(step, 3, 0, 10) == pytest.approx(0.1)
    assert lr_factor(step, 7, 5, 10) == pytest.approx(0.01)
    cos = OptimConfig(lr=1.0, epochs=4, schedule="cosine", warmup_epochs=1.0)
    assert lr_factor(cos, 0, 0, 4) == pytest.approx(0.25)
    assert lr_factor(cos, 0, 3, 4) == pytest.approx(1.0)
    assert lr_factor(cos, 2, 2, 4) == pytest.approx(0.5)
    assert lr_factor(cos, 3, 3, 4) < 0.05


# --------------------------------------------------------------------------- data


def test_folder_split_validation_and_items(tmp_path):
    root = make_image_folder(tmp_path / "f", n_classes=10, per_class=3)
    d = {"dataset": "folder", "root": str(root), "val_fraction": 0.4, "val_seed": 0}
    sc = split_classes(d)
    train_names = {c for c, _ in sc["train"]}
    val_names = {c for c, _ in sc["val"]}
    test_names = {c for c, _ in sc["test"]}
    assert test_names == {f"c{i:02d}" for i in range(5, 10)}  # default: second half of sorted classes
    assert len(val_names) == 2 and val_names <= {f"c{i:02d}" for i in range(5)}
    assert not (train_names & val_names) and not (train_names & test_names)
    items = dataset_items(d, "val")
    assert sorted({y for _, y in items}) == [0, 1] and all(Path(p).is_file() for p, _ in items)
    assert {y for _, y in dataset_items(d, "train")} == {0, 1, 2}
    # paper protocol: no validation split
    assert dataset_items({**d, "select_on": "test"}, "val") == []
    assert len(dataset_items({**d, "val_fraction": 0}, "train")) == 15


def test_images_subfolder_and_bad_roots(tmp_path):
    make_image_folder(tmp_path / "ds" / "images", n_classes=4, per_class=2)
    assert len(dataset_items({"dataset": "folder", "root": str(tmp_path / "ds")}, "test")) == 4
    with pytest.raises(DataError, match="does not exist"):
        dataset_items({"dataset": "folder", "root": str(tmp_path / "missing")}, "train")
    with pytest.raises(DataError, match="no dataset root"):
        dataset_items({"dataset": "folder", "root": ""}, "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        dataset_items({"dataset": "folder", "root": str(tmp_path / "empty")}, "train")
    with pytest.raises(DataError, match="Ebay_train.txt"):
        dataset_items({"dataset": "sop", "root": str(tmp_path / "empty")}, "train")


def test_min_images_per_class_drops_with_warning(tmp_path, caplog):
    root = make_image_folder(tmp_path / "f", n_classes=6, per_class=3)
    for f in list((root / "c00").iterdir())[1:]:
        f.unlink()
    with caplog.at_level("WARNING"):
        kept = training_classes({"dataset": "folder", "root": str(root), "min_images_per_class": 2})
    assert [c for c, _ in kept] == ["c01", "c02"] and "c00" in caplog.text


def test_cub_sop_inshop_omniglot_layouts(tmp_path):
    cub = tmp_path / "cub" / "images"
    for i in range(1, 201):
        (cub / f"{i:03d}.Bird_{i}").mkdir(parents=True)
        (cub / f"{i:03d}.Bird_{i}" / "a.jpg").write_bytes(b"x")
    sc = split_classes({"dataset": "cub", "root": str(tmp_path / "cub"), "val_fraction": 0})
    assert sc["train"][0][0] == "001.Bird_1" and sc["train"][-1][0] == "100.Bird_100"
    assert sc["test"][0][0] == "101.Bird_101" and len(sc["test"]) == 100

    sop = tmp_path / "sop"
    sop.mkdir()
    (sop / "Ebay_train.txt").write_text("image_id class_id super_class_id path\n1 1 1 a/1.jpg\n2 1 1 a/2.jpg\n"
                                        "3 2 1 a/3.jpg\n")
    (sop / "Ebay_test.txt").write_text("image_id class_id super_class_id path\n1 5 1 b/1.jpg\n2 6 1 b/2.jpg\n")
    items = dataset_items({"dataset": "sop", "root": str(sop), "val_fraction": 0}, "train")
    assert items == [(str(sop / "a/1.jpg"), 0), (str(sop / "a/2.jpg"), 0), (str(sop / "a/3.jpg"), 1)]

    ins = tmp_path / "inshop"
    ins.mkdir()
    (ins / "list_eval_partition.txt").write_text(
        "5\nimage_name item_id evaluation_status\nimg/1.jpg id_1 train\nimg/2.jpg id_1 train\n"
        "img/3.jpg id_2 query\nimg/4.jpg id_2 gallery\nimg/5.jpg id_3 gallery\n")
    d = {"dataset": "inshop", "root": str(ins), "val_fraction": 0}
    q, g = dataset_items(d, "query"), dataset_items(d, "gallery")
    assert q == [(str(ins / "img/3.jpg"), 0)] and g == [(str(ins / "img/4.jpg"), 0), (str(ins / "img/5.jpg"), 1)]
    assert len(dataset_items(d, "test")) == 3

    om = tmp_path / "om"
    for split, alpha in (("images_background", "Latin"), ("images_evaluation", "Greek")):
        for ch in ("character01", "character02"):
            (om / split / alpha / ch).mkdir(parents=True)
            (om / split / alpha / ch / "x.png").write_bytes(b"x")
    sc = split_classes({"dataset": "omniglot", "root": str(om), "val_fraction": 0})
    assert [c for c, _ in sc["train"]] == ["Latin/character01", "Latin/character02"]
    assert [c for c, _ in sc["test"]] == ["Greek/character01", "Greek/character02"]


def test_real_flowers_and_omniglot_protocols(shared_data):
    fl = split_classes({"dataset": "folder", "root": str(shared_data / "flowers102"), "num_train_classes": 51,
                        "val_fraction": 0})
    assert [c for c, _ in fl["train"]][[0, -1][1]] == "051" and fl["test"][0][0] == "052"
    assert sum(len(f) for _, f in fl["train"]) == 3493 and sum(len(f) for _, f in fl["test"]) == 4696
    om = split_classes({"dataset": "omniglot", "root": str(shared_data / "omniglot"), "val_fraction": 0})
    assert len(om["train"]) == 964 and len(om["test"]) == 659


# --------------------------------------------------------------------------- augmentation and evaluation


def test_train_dataset_is_seeded_and_skips_bad_images(tmp_path, caplog):
    from trainer.transforms import BadImageError, TrainDataset, train_transform

    cfg = tiny_config(make_image_folder(tmp_path / "f", n_classes=8, per_class=4))
    items = dataset_items(cfg.data, "train")
    tf = train_transform(cfg.augment)
    ds = TrainDataset(items, tf)
    a, b, c = ds[(0, 123)], ds[(0, 123)], ds[(0, 124)]
    assert a[0].shape == (3, 32, 32) and torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])
    Path(items[1][0]).write_bytes(b"not an image")
    with caplog.at_level("WARNING"):
        x, y, idx, ok = ds[(1, 5)]
    assert y == items[1][1] and idx == 1 and not ok and items[1][0] in caplog.text
    with pytest.raises(BadImageError, match=items[1][0]):
        TrainDataset(items, tf, on_bad_image="stop")[(1, 5)]


def test_embed_items_uses_sdk_preprocess(tmp_path):
    from models import IBCModel
    from sdk.preprocess import preprocess_batch
    from trainer.evaluate import embed_items

    cfg = tiny_config(make_image_folder(tmp_path / "f", n_classes=8, per_class=3))
    cfg.model.num_classes = 2
    model = IBCModel(cfg.model).eval()
    items = dataset_items(cfg.data, "test")
    emb, labels = embed_items(model, items, cfg.preprocess.to_dict(), batch_size=4)
    ref = model.inference_embedder()(torch.from_numpy(preprocess_batch([p for p, _ in items], cfg.preprocess)))
    np.testing.assert_allclose(emb, ref.detach().numpy(), atol=1e-5)
    assert labels.tolist() == [y for _, y in items]
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    Path(items[0][0]).write_bytes(b"")  # an unreadable file is skipped, not fatal
    emb2, labels2 = embed_items(model, items, cfg.preprocess, batch_size=4)
    assert len(emb2) == len(items) - 1 and labels2.tolist() == [y for _, y in items[1:]]
