"""SimKD (Chen et al., CVPR 2022): distillation with the reused teacher classifier.

The student's last feature map goes through a trainable projector to the teacher's channel count;
the loss is a single MSE between that and the teacher's last feature map; at inference the teacher's
own frozen pooling + classifier (its "head") classifies the projected student features. The deployed
student is ``head(projector(student_body(x)))``, so the projector and the head are part of its size.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdpipe.config import DistillConfig
from kdpipe.ml.data import Batch
from kdpipe.ml.split import split_model
from kdpipe.ml.zoo import count_parameters, create_model
from kdpipe.stages.distillers.base import (
    DISTILLERS,
    Built,
    DataInfo,
    Distiller,
    TeacherParts,
    frozen_copy,
    pool,
    spec_shapes,
    split_student,
    teacher_split,
)


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
        return self.projector(pool(self.body(x), self.pool_to))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def train(self, mode: bool = True) -> SimKDStudent:
        super().train(mode)
        self.head.eval()  # the reused classifier is frozen, its norm statistics too
        return self

    def parameter_breakdown(self) -> dict[str, int]:
        parts = {name: count_parameters(getattr(self, name)) for name in ("body", "projector", "head")}
        return {**parts, "total": sum(parts.values())}


@DISTILLERS.register("simkd")
class SimKD(Distiller):
    """MSE between the projected student map and the teacher map, on full C×H×W maps (no CE, no KL)."""

    name = "simkd"
    title = "SimKD"
    signals = frozenset({"features"})
    why_features = "reuses the teacher's classifier"

    def build(self, teacher: TeacherParts, student_arch: str, data: DataInfo, conf: DistillConfig) -> Built:
        student = create_model(student_arch, num_classes=data.num_classes, in_channels=data.in_channels)
        s = split_student(student, data, conf.student_feature_node)
        t = teacher_split(teacher, self.title)
        spec = {
            **self.base_spec(teacher, student_arch, data),
            "student_feature_node": s.node,
            "teacher_feature_node": t.node,
            "factor": conf.factor,
            **spec_shapes(s.feature_shape, t.feature_shape),
        }
        projector = Projector(s.feature_shape[0], t.feature_shape[0], conf.factor)
        model = SimKDStudent(s.body, projector, frozen_copy(t.head), spec["student_pool_to"])
        return Built(model=model, trainable=model, spec=spec)

    def loss(self, built: Built, batch: Batch, teacher: dict[str, torch.Tensor]) -> torch.Tensor:
        projected = built.model.features(batch.x)
        target = pool(teacher["features"], built.spec["teacher_pool_to"])
        return F.mse_loss(projected, target.to(projected.dtype))

    @classmethod
    def rebuild(cls, spec: dict[str, Any]) -> SimKDStudent:
        """The teacher head is rebuilt from the teacher *architecture*; its weights come with student.pt."""
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

    def parameter_breakdown(self, built: Built) -> dict[str, int]:
        return built.model.parameter_breakdown()
