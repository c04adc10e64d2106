"""FitNet (Romero et al., ICLR 2015), one-stage as in the CRD code base: hints on the last feature map.

``loss = CE(student, y) + beta * MSE(regressor(student_map), teacher_map)``, where the regressor is a
Conv1x1(C_s→C_t) + BN used only in training, and the larger of the two maps is average-pooled down to the
smaller (as in SimKD). The student runs once per step: its body's output feeds both the hint and its head.
The deployable is the plain student; training works on its fx body/head split, which runs on the very
same modules (see :func:`~kdpipe.stages.distillers.base.tie`), so the trained weights are the
deployable's without any copying. With several teachers there is one regressor per teacher and the hints are
summed: ``CE + beta * Σᵢ MSE(regressorᵢ(student_map), teacher_mapᵢ)``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdpipe.config import DistillConfig
from kdpipe.ml.data.memory import Batch
from kdpipe.stages.distillers.base import (
    DISTILLERS,
    BodyHead,
    Built,
    DataInfo,
    Distiller,
    TeacherParts,
    labeled_ce,
    merged_parts,
    pool,
    spec_shapes,
    split_facts,
    teacher_split,
    teachers_spec,
    trained_split,
)


class Regressor(nn.Sequential):
    """Conv1x1(C_s→C_t, no bias) → BN: maps the student's feature map into the teacher's channels."""

    def __init__(self, s_channels: int, t_channels: int) -> None:
        super().__init__(nn.Conv2d(s_channels, t_channels, 1, bias=False), nn.BatchNorm2d(t_channels))
        nn.init.kaiming_normal_(self[0].weight, mode="fan_out", nonlinearity="relu")


class FitNetTrainer(BodyHead):
    """What FitNet optimises: the student as body + head, plus the training-only regressor."""

    def __init__(self, body: nn.Module, head: nn.Module, regressor: Regressor) -> None:
        super().__init__(body, head)
        self.regressor = regressor


@DISTILLERS.register()
class FitNet(Distiller):
    name = "fitnet"
    title = "FitNet"
    signals = frozenset({"features"})
    ensemble = "each"  # several teachers: a regressor each, their hints summed

    def build(self, teacher: TeacherParts, student_arch: str, data: DataInfo, conf: DistillConfig) -> Built:
        student = data.create(student_arch, conf.student_kwargs)
        s, body, head = trained_split(student, data, conf.student_feature_node, self.title)
        t = teacher_split(teacher, self.title)
        spec = {
            **self.base_spec(teacher, student_arch, data, conf),
            **split_facts(s, t),
            **spec_shapes(s.feature_shape, t.feature_shape),
            "beta": conf.fitnet.beta,
            "label_smoothing": conf.train.label_smoothing,
        }
        trainer = FitNetTrainer(body, head, Regressor(s.feature_shape[0], t.feature_shape[0]))
        return Built(model=student, trainable=trainer, spec=spec)

    def loss(self, built: Built, batch: Batch, teacher: dict[str, torch.Tensor]) -> torch.Tensor:
        spec, net = built.spec, built.trainable
        features = net.body(batch.x)  # one student forward: the hint and the logits share it
        logits = net.head(features)
        ce = labeled_ce(logits, batch.y, spec["label_smoothing"])  # the hint needs no label: every image
        return ce + spec["beta"] * hint_loss(net.regressor, features, teacher["features"], spec)

    def build_many(self, teachers: list[TeacherParts], student_arch: str, data: DataInfo, conf: DistillConfig) -> Built:
        """One regressor per teacher (each into its teacher's channels and map size), the student shared."""
        student = data.create(student_arch, conf.student_kwargs)
        s, body, head = trained_split(student, data, conf.student_feature_node, self.title)
        each, regressors = [], []
        for parts in teachers:
            t = teacher_split(parts, self.title)
            facts = {"teacher_feature_node": t.node, "teacher_split_mode": t.mode}
            each.append({**teachers_spec([parts])[0], **facts, **spec_shapes(s.feature_shape, t.feature_shape)})
            regressors.append(Regressor(s.feature_shape[0], t.feature_shape[0]))
        spec = {
            **self.base_spec(merged_parts(teachers), student_arch, data, conf),
            "student_feature_node": s.node,
            "student_split_mode": s.mode,
            "student_feature_shape": list(s.feature_shape),
            "beta": conf.fitnet.beta,
            "label_smoothing": conf.train.label_smoothing,
            "teachers": each,
        }
        return Built(model=student, trainable=FitNetTrainer(body, head, nn.ModuleList(regressors)), spec=spec)


def hint_loss(
    regressor: nn.Module, features: torch.Tensor, teacher: torch.Tensor | list[torch.Tensor], spec: dict[str, Any]
) -> torch.Tensor:
    """``MSE(regressor(pool(student map)), pool(teacher map))``; with several teachers (a list of their maps and a
    regressor each) the sum of every teacher's hint."""
    if not isinstance(teacher, list):
        hint = regressor(pool(features, spec["student_pool_to"]))
        return F.mse_loss(hint, pool(teacher, spec["teacher_pool_to"]).to(hint.dtype))
    total = features.new_zeros((), dtype=torch.float32)
    for reg, target, facts in zip(regressor, teacher, spec["teachers"], strict=True):
        hint = reg(pool(features, facts["student_pool_to"]))
        total = total + F.mse_loss(hint, pool(target, facts["teacher_pool_to"]).to(hint.dtype))
    return total
