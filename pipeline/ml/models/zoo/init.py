"""The weight initialisation the CIFAR model zoo shares (as in the RepDistiller/SimKD code bases)."""

from __future__ import annotations

from torch import nn


def kaiming_init(module: nn.Module, linear_std: float | None = None, zero_linear_bias: bool = False) -> None:
    """Kaiming-normal (fan_out) convolutions with zero bias, BatchNorm at weight 1 and bias 0.

    Args:
        linear_std: if given, linear weights ~ N(0, std) with zero bias (MobileNetV2).
        zero_linear_bias: zero the linear biases and leave PyTorch's default weights (WRN).
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and (linear_std is not None or zero_linear_bias):
            if linear_std is not None:
                nn.init.normal_(m.weight, 0, linear_std)
            nn.init.zeros_(m.bias)
