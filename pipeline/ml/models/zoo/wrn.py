"""Wide ResNets (Zagoruyko & Komodakis 2016) as used by CRD/SimKD (RepDistiller ``models/wrn.py``).

``wrn_<depth>_<k>``: pre-activation blocks, ``n = (depth - 4) / 6`` per stage, widths ``16k, 32k, 64k``. The body
ends with BN + ReLU after the last stage, then an adaptive global average pool (the original used
``avg_pool2d(out, 8)``) so 28x28 and 32x32 inputs both work. Module names match the original so its checkpoints load.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdpipe.ml.models.zoo.base import MODELS
from kdpipe.ml.models.zoo.init import kaiming_init


class BasicBlock(nn.Module):
    """Pre-activation block: bn-relu-conv-bn-relu-(dropout)-conv plus shortcut.

    When the shape changes, the pre-activation is shared by both branches and the shortcut is a 1x1 projection of it
    (the original behaviour); otherwise the shortcut is the raw input.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = in_planes == out_planes and stride == 1
        # Name kept from the original for checkpoint compatibility.
        self.convShortcut = (
            None
            if self.equal_in_out
            else nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, padding=0, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(pre)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        shortcut = x if self.convShortcut is None else self.convShortcut(pre)
        return shortcut + out


class NetworkBlock(nn.Module):
    """One stage: ``nb_layers`` blocks, the first one changing width and stride."""

    def __init__(self, nb_layers: int, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *(
                BasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, drop_rate)
                for i in range(nb_layers)
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """Wide ResNet for small images.

    Args:
        depth: 6n + 4 (16, 22, 28, 40).
        widen_factor: k, the width multiplier.
        num_classes: classifier outputs.
        in_channels: input image channels.
        drop_rate: dropout inside blocks (0 in the KD papers).
    """

    def __init__(
        self, depth: int, widen_factor: int, num_classes: int, in_channels: int, drop_rate: float = 0.0
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"Wide ResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, channels[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, channels[0], channels[1], 1, drop_rate)
        self.block2 = NetworkBlock(n, channels[1], channels[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, channels[2], channels[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels[3], num_classes)

        kaiming_init(self, zero_linear_bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.block1(out)
        out = self.block2(out)
        out = self.block3(out)
        out = self.relu(self.bn1(out))
        out = self.avgpool(out)
        out = torch.flatten(out, 1)
        return self.fc(out)


@MODELS.register()
def wrn_16_1(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return WideResNet(16, 1, num_classes, in_channels)


@MODELS.register()
def wrn_16_2(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return WideResNet(16, 2, num_classes, in_channels)


@MODELS.register()
def wrn_40_1(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return WideResNet(40, 1, num_classes, in_channels)


@MODELS.register()
def wrn_40_2(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return WideResNet(40, 2, num_classes, in_channels)
