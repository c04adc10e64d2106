"""CIFAR MobileNetV2 as used by CRD/SimKD (RepDistiller ``models/mobilenetv2.py``).

Differences from ImageNet MobileNetV2 follow the original: a stride-2 3x3 stem and strides (1, 1, 2, 2, 1, 2, 1) over
the seven inverted-residual stages, so a 32x32 input ends as a 2x2 map (28x28 too: 14, 7, 4, 2). The last 1x1 conv
keeps 1280 channels for widths <= 1. ``mobilenetv2`` is the original's ``mobile_half`` (width 0.5, expansion 6), the
student of the SimKD paper. Module names match the original so its checkpoints load.
"""

from __future__ import annotations

import torch
from torch import nn

from kdpipe.ml.models.zoo.base import MODELS
from kdpipe.ml.models.zoo.init import kaiming_init

# (expansion, channels, blocks, first stride); expansion None means "use T".
_STAGES: tuple[tuple[int | None, int, int, int], ...] = (
    (1, 16, 1, 1),
    (None, 24, 2, 1),
    (None, 32, 3, 2),
    (None, 64, 4, 2),
    (None, 96, 3, 1),
    (None, 160, 3, 2),
    (None, 320, 1, 1),
)


def conv_bn(inp: int, oup: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, oup, 3, stride, 1, bias=False), nn.BatchNorm2d(oup), nn.ReLU(inplace=True))


def conv_1x1_bn(inp: int, oup: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup), nn.ReLU(inplace=True))


class InvertedResidual(nn.Module):
    """1x1 expand, 3x3 depthwise, 1x1 linear projection; identity shortcut when the shape is unchanged."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        hidden = inp * expand_ratio
        self.use_res_connect = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 for small images.

    Args:
        expansion: T, the expansion ratio of all but the first stage.
        width_mult: channel multiplier.
        num_classes: classifier outputs.
        in_channels: input image channels.
    """

    def __init__(self, expansion: int, width_mult: float, num_classes: int, in_channels: int) -> None:
        super().__init__()
        input_channel = int(32 * width_mult)
        self.conv1 = conv_bn(in_channels, input_channel, 2)
        self.blocks = nn.ModuleList()
        for t, c, n, s in _STAGES:
            output_channel = int(c * width_mult)
            layers = []
            for i in range(n):
                layers.append(InvertedResidual(input_channel, output_channel, s if i == 0 else 1, t or expansion))
                input_channel = output_channel
            self.blocks.append(nn.Sequential(*layers))
        self.last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = conv_1x1_bn(input_channel, self.last_channel)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(self.last_channel, num_classes))
        self._initialize_weights()

    def _initialize_weights(self) -> None:
        # He-normal with fan_out = k*k*out_channels for convs, N(0, 0.01) for the classifier, as the original.
        kaiming_init(self, linear_std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        for stage in self.blocks:
            out = stage(out)
        out = self.conv2(out)
        out = self.avgpool(out)
        out = torch.flatten(out, 1)
        return self.classifier(out)


@MODELS.register()
def mobilenetv2(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """Width 0.5, T=6 (RepDistiller's ``mobile_half``)."""
    return MobileNetV2(6, 0.5, num_classes, in_channels)


@MODELS.register()
def mobilenetv2_w1(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """Width 1.0, T=6."""
    return MobileNetV2(6, 1.0, num_classes, in_channels)
