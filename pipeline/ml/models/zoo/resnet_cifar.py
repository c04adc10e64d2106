"""CIFAR-style ResNets (He et al. 2016, section 4.2) as used by CRD/SimKD (RepDistiller ``models/resnet.py``).

Three stages of BasicBlocks with ``n = (depth - 2) / 6`` blocks each, a 3x3 stride-1 stem, and a global average
pool. The pool is adaptive (the original used ``AvgPool2d(8)``) so 28x28 and 32x32 inputs both work. Module names
match the original so its checkpoints load.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdpipe.ml.models.zoo.base import MODELS
from kdpipe.ml.models.zoo.init import kaiming_init

THIN = (16, 16, 32, 64)
WIDE_X4 = (32, 64, 128, 256)


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """conv-bn-relu-conv-bn plus a (projected when the shape changes) shortcut, then relu."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        residual = x if self.downsample is None else self.downsample(x)
        return F.relu(out + residual)


class CifarResNet(nn.Module):
    """ResNet for small images.

    Args:
        depth: 6n + 2 (8, 14, 20, 32, 44, 56, 110).
        num_filters: channels of the stem and of the three stages.
        num_classes: classifier outputs.
        in_channels: input image channels.
    """

    def __init__(self, depth: int, num_filters: tuple[int, int, int, int], num_classes: int, in_channels: int) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.inplanes = num_filters[0]
        self.conv1 = nn.Conv2d(in_channels, num_filters[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(num_filters[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(num_filters[1], n)
        self.layer2 = self._make_layer(num_filters[2], n, stride=2)
        self.layer3 = self._make_layer(num_filters[3], n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(num_filters[3] * BasicBlock.expansion, num_classes)

        kaiming_init(self)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        out_planes = planes * BasicBlock.expansion
        downsample = None
        if stride != 1 or self.inplanes != out_planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, out_planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_planes),
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = out_planes
        layers += [BasicBlock(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


@MODELS.register()
def resnet8(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return CifarResNet(8, THIN, num_classes, in_channels)


@MODELS.register()
def resnet14(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return CifarResNet(14, THIN, num_classes, in_channels)


@MODELS.register()
def resnet20(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return CifarResNet(20, THIN, num_classes, in_channels)


@MODELS.register()
def resnet32(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return CifarResNet(32, THIN, num_classes, in_channels)


@MODELS.register()
def resnet44(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return CifarResNet(44, THIN, num_classes, in_channels)


@MODELS.register()
def resnet56(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return CifarResNet(56, THIN, num_classes, in_channels)


@MODELS.register()
def resnet110(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return CifarResNet(110, THIN, num_classes, in_channels)


@MODELS.register()
def resnet8x4(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return CifarResNet(8, WIDE_X4, num_classes, in_channels)


@MODELS.register()
def resnet32x4(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return CifarResNet(32, WIDE_X4, num_classes, in_channels)
