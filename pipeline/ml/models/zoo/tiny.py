"""Tiny CNNs for fast tests: a student (``tiny_cnn``, ~1.4K params) and a larger teacher (``tiny_cnn_wide``)."""

from __future__ import annotations

import torch
from torch import nn

from kdpipe.ml.models.zoo.base import MODELS
from kdpipe.ml.models.zoo.init import kaiming_init


class TinyCNN(nn.Module):
    """Two conv-bn-relu blocks (the second with stride 2), global average pool, linear.

    Args:
        widths: output channels of the two conv blocks.
        num_classes: classifier outputs.
        in_channels: input image channels.
    """

    def __init__(self, widths: tuple[int, int], num_classes: int, in_channels: int) -> None:
        super().__init__()
        c1, c2 = widths
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(c1),
            nn.ReLU(inplace=True),
            nn.Conv2d(c1, c2, kernel_size=3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(c2),
            nn.ReLU(inplace=True),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c2, num_classes)
        kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


@MODELS.register()
def tiny_cnn(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return TinyCNN((8, 16), num_classes, in_channels)


@MODELS.register()
def tiny_cnn_wide(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return TinyCNN((16, 32), num_classes, in_channels)
