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
from kdpipe.ml.zoo import count_parameters
from kdpipe.stages.distillers.base import (
    DISTILLERS,
    Built,
    DataInfo,
    Distiller,
    TeacherParts,
    common_size,
    feature_node,
    frozen_copy,
    pool,
    spec_shapes,
    split_facts,
    split_student,
    teacher_split,
)


def conv_bn_relu(cin: int, cout: int, k: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class Projector(nn.Sequential):
    """Conv1x1(C_s→C_t/f) → BN → ReLU → Conv3x3(C_t/f→C_t/f) → BN → ReLU → Conv1x1(C_t/f→C_t) → BN → ReLU.

    ``kernel`` is the middle convolution's size: 1 where the aligned maps are 1×1 (a token teacher's
    pre-logits, or maps pooled to one pixel), since a 3×3 kernel there would only ever use its centre tap;
    the projector is then a three-layer MLP on the pooled features.

    ``final_relu``: SimKD's last ReLU fits a teacher whose features end in a ReLU (never negative). Where they
    can be negative (a ViT's LayerNorm'd pre-logits, ConvNeXt's residual output, hard-swish) it would keep the
    projection from ever matching them, so it is left out there (see :func:`teacher_nonnegative`).
    """

    def __init__(
        self, s_channels: int, t_channels: int, factor: int = 2, kernel: int = 3, final_relu: bool = True
    ) -> None:
        hidden = max(1, t_channels // factor)
        last = conv_bn_relu(hidden, t_channels, 1)
        super().__init__(
            *conv_bn_relu(s_channels, hidden, 1),
            *conv_bn_relu(hidden, hidden, kernel),
            *(last if final_relu else last[:-1]),
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


def projector_parameters(s_channels: int, t_channels: int, factor: int, kernel: int = 3) -> int:
    """Parameters of ``Projector(s_channels, t_channels, factor, kernel)``, without building it."""
    h = max(1, t_channels // factor)
    return s_channels * h + h * h * kernel * kernel + h * t_channels + 2 * (h + h + t_channels)


def teacher_nonnegative(body: nn.Module, input_shape: tuple[int, ...] | list[int]) -> bool:
    """Whether the teacher body's features are never negative (it ends in a ReLU): checked on a seeded random
    batch, which any other last layer (LayerNorm, a residual sum, hard-swish, SiLU) turns negative somewhere."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(8, *input_shape, generator=generator)
    was = body.training
    body.eval()
    try:
        with torch.no_grad():
            return bool((body(x) >= 0).all())
    finally:
        body.train(was)


def projector_kernel(s_shape: tuple[int, ...], t_shape: tuple[int, ...]) -> int:
    """3 (SimKD's 3×3 middle convolution), or 1 where the aligned maps are 1×1 pixel."""
    return 1 if tuple(common_size(s_shape[1:], t_shape[1:])) == (1, 1) else 3  # type: ignore[arg-type]


@DISTILLERS.register()
class SimKD(Distiller):
    """MSE between the projected student map and the teacher map, on full C×H×W maps (no CE, no KL)."""

    name = "simkd"
    title = "SimKD"
    signals = frozenset({"features"})
    why_features = "reuses the teacher's classifier"

    def build(self, teacher: TeacherParts, student_arch: str, data: DataInfo, conf: DistillConfig) -> Built:
        student = data.create(student_arch, conf.student_kwargs)
        s = split_student(student, data, conf.student_feature_node)
        t = teacher_split(teacher, self.title)
        spec = {
            **self.base_spec(teacher, student_arch, data, conf),
            **split_facts(s, t),
            "factor": conf.factor,
            **spec_shapes(s.feature_shape, t.feature_shape),
        }
        spec["projector_kernel"] = projector_kernel(s.feature_shape, t.feature_shape)
        spec["projector_final_relu"] = teacher_nonnegative(t.body, data.input_shape)
        projector = Projector(
            s.feature_shape[0], t.feature_shape[0], conf.factor, spec["projector_kernel"], spec["projector_final_relu"]
        )
        model = SimKDStudent(s.body, projector, frozen_copy(t.head), spec["student_pool_to"])
        return Built(model=model, trainable=model, spec=spec)

    def loss(self, built: Built, batch: Batch, teacher: dict[str, torch.Tensor]) -> torch.Tensor:
        projected = built.model.features(batch.x)
        target = pool(teacher["features"], built.spec["teacher_pool_to"])
        return F.mse_loss(projected, target.to(projected.dtype))

    @classmethod
    def rebuild(cls, spec: dict[str, Any]) -> SimKDStudent:
        """The teacher head is rebuilt from the teacher *architecture*; its weights come with student.pt."""
        data = DataInfo.of_spec(spec)
        s = split_model(
            data.create(spec["student_arch"], spec.get("student_kwargs")),
            data.example(),
            feature_node(spec, "student"),
            what="distill.student",
        )
        t = split_model(
            data.create(spec["teacher_arch"], spec.get("teacher_kwargs")),
            data.example(),
            feature_node(spec, "teacher"),
            what="teacher.arch",
        )
        kernel = spec.get("projector_kernel", 3)  # students saved before token teachers: always 3×3, final ReLU
        relu = spec.get("projector_final_relu", True)
        projector = Projector(s.feature_shape[0], t.feature_shape[0], spec["factor"], kernel, relu)
        return SimKDStudent(s.body, projector, t.head, spec["student_pool_to"])

    def parameter_breakdown(self, built: Built) -> dict[str, int]:
        return built.model.parameter_breakdown()
