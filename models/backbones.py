"""Backbone registry: torchvision trunks by name, global pooling, and the embedding head.

Why a registry: the trainer, the exporter and the benchmarks name a backbone in a config string
(``resnet50`` as in the paper, ``resnet18`` / ``mobilenet_v3_*`` for the edge) and must all build
the same network from it.

Pretrained weights are never downloaded: ``pretrained=True`` looks for torchvision's weight file
in the torch hub cache, ``pretrained="/path/file.pth"`` loads that file, and either raises
:class:`PretrainedWeightsNotFound` with the places it looked when the file is absent. A silent
random init when weights were asked for would ruin an experiment without anyone noticing.
"""

from __future__ import annotations

from sdk.errors import IbcError

import os
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from models._torchvision import tv_models

POOLINGS = ("max", "avg", "maxavg")


class PretrainedWeightsNotFound(IbcError, FileNotFoundError):
    """Pretrained weights were asked for but no local file holds them."""


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one registered trunk."""

    name: str
    builder: Callable[[], nn.Module]
    features: Callable[[nn.Module], nn.Module]  # the trunk without its pooling and classifier
    feature_dim: int
    weights: object  # torchvision weights enum member (for its file name)


def _resnet_trunk(m: nn.Module) -> nn.Module:
    return nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool, m.layer1, m.layer2, m.layer3, m.layer4)


def _features_trunk(m: nn.Module) -> nn.Module:
    return m.features


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
    register_backbone(BackboneSpec(_name, _builder, _trunk, _dim, _w))


def list_backbones() -> list[str]:
    return sorted(_REGISTRY)


def get_backbone_spec(name: str) -> BackboneSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; known: {', '.join(list_backbones())}") from None


def _weight_candidates(spec: BackboneSpec) -> list[str]:
    filename = os.path.basename(spec.weights.url)
    hub_dir = torch.hub.get_dir()
    return [os.path.join(hub_dir, "checkpoints", filename)]


def load_pretrained_state(spec: BackboneSpec, pretrained: bool | str) -> dict:
    """Read ImageNet weights from a local file; raise a clear error when there is none."""
    candidates = [os.fspath(pretrained)] if isinstance(pretrained, (str, os.PathLike)) else _weight_candidates(spec)
    for path in candidates:
        if os.path.isfile(path):
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
                raise PretrainedWeightsNotFound(f"cannot read pretrained weights {path}: {e}") from e
            if isinstance(state, dict) and "state_dict" in state:
                state = state["state_dict"]
            return state
    raise PretrainedWeightsNotFound(
        f"pretrained weights for {spec.name} were asked for but not found (looked in: {', '.join(candidates)}). "
        f"This machine cannot download them: copy {os.path.basename(spec.weights.url)} there, pass a file path, "
        "or train from scratch with pretrained=false."
    )


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
            net.load_state_dict(load_pretrained_state(spec, pretrained))
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
