"""SimKD (Chen et al., CVPR 2022): distillation with the reused teacher classifier.

The student's last feature map goes through a trainable projector to the teacher's channel count;
the loss is a single MSE between that and the teacher's last feature map; at inference the teacher's
own frozen pooling + classifier (its "head") classifies the projected student features. The deployed
student is ``head(projector(student_body(x)))``, so the projector and the head are part of its size.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.split import split_model
from pipeline.zoo import create_model


def conv_bn_relu(cin: int, cout: int, k: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class Projector(nn.Sequential):
    """Conv1x1(C_s→C_t/f) → BN → ReLU → Conv3x3(C_t/f→C_t/f) → BN → ReLU → Conv1x1(C_t/f→C_t) → BN → ReLU."""

    def __init__(self, s_channels: int, t_channels: int, factor: int = 2) -> None:
        hidden = max(1, t_channels // factor)
        super().__init__(
            *conv_bn_relu(s_channels, hidden, 1), *conv_bn_relu(hidden, hidden, 3), *conv_bn_relu(hidden, t_channels, 1)
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


def common_size(s_hw: tuple[int, int], t_hw: tuple[int, int]) -> tuple[int, int]:
    """The smaller of the two spatial sizes: the larger map is average-pooled down to it."""
    return (min(s_hw[0], t_hw[0]), min(s_hw[1], t_hw[1]))


class SimKDStudent(nn.Module):
    """The deployable student: student body → (pool) → projector → the teacher's frozen head.

    ``pool_to`` is fixed when the model is built (from both feature shapes), so no forward pass of the
    teacher is needed to learn it.
    """

    def __init__(self, body: nn.Module, projector: nn.Module, head: nn.Module, pool_to: tuple[int, int] | None) -> None:
        super().__init__()
        self.body = body
        self.projector = projector
        self.head = head
        self.pool_to = tuple(pool_to) if pool_to else None
        for p in self.head.parameters():
            p.requires_grad_(False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Projected student features, in the teacher's feature space."""
        f = self.body(x)
        if self.pool_to is not None:
            f = F.adaptive_avg_pool2d(f, self.pool_to)
        return self.projector(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def train(self, mode: bool = True) -> SimKDStudent:
        super().train(mode)
        self.head.eval()  # the reused classifier is frozen, its norm statistics too
        return self

    def parameter_breakdown(self) -> dict[str, int]:
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        parts = {"body": count(self.body), "projector": count(self.projector), "head": count(self.head)}
        return {**parts, "total": sum(parts.values())}


class SimKDLoss(nn.Module):
    """MSE between the projected student map and the teacher map, on full C×H×W maps (no CE, no KL)."""

    def __init__(self, teacher_body: nn.Module, pool_teacher: list[int] | tuple[int, int] | None) -> None:
        super().__init__()
        self.teacher_body = teacher_body
        self.pool_teacher = tuple(pool_teacher) if pool_teacher else None

    def forward(self, student: SimKDStudent, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = self.teacher_body(x)
            if self.pool_teacher is not None:
                target = F.adaptive_avg_pool2d(target, self.pool_teacher)
        return F.mse_loss(student.features(x), target)


def spec_shapes(s_shape: tuple[int, int, int], t_shape: tuple[int, int, int]) -> dict[str, Any]:
    """The shape facts a SimKD student is rebuilt from."""
    size = common_size(s_shape[1:], t_shape[1:])  # type: ignore[arg-type]
    return {
        "student_feature_shape": list(s_shape),
        "teacher_feature_shape": list(t_shape),
        "student_pool_to": list(size) if tuple(size) != tuple(s_shape[1:]) else None,
        "teacher_pool_to": list(size) if tuple(size) != tuple(t_shape[1:]) else None,
    }


STUDENT_STATE = "student.pt"
STUDENT_SPEC = "student.json"


def build_student(spec: dict[str, Any]) -> SimKDStudent:
    """A freshly initialised deployable student from its spec (no teacher file needed)."""
    example = torch.zeros(2, *spec["input_shape"])
    s = split_model(
        create_model(spec["student_arch"], num_classes=spec["num_classes"], in_channels=spec["in_channels"]),
        example,
        spec["student_feature_node"],
        what="distill.student",
    )
    t = split_model(
        create_model(spec["teacher_arch"], num_classes=spec["num_classes"], in_channels=spec["in_channels"]),
        example,
        spec["teacher_feature_node"],
        what="teacher.arch",
    )
    projector = Projector(s.feature_shape[0], t.feature_shape[0], spec["factor"])
    return SimKDStudent(s.body, projector, t.head, spec["student_pool_to"])


def load_student(folder: Path) -> tuple[SimKDStudent, dict[str, Any]]:
    """The deployable student committed by the distill stage, in eval mode."""
    spec = json.loads((folder / STUDENT_SPEC).read_text())
    model = build_student(spec)
    model.load_state_dict(torch.load(folder / STUDENT_STATE, map_location="cpu", weights_only=True))
    return model.eval(), spec
