"""FitNet (Romero et al., ICLR 2015), one-stage as in the CRD code base: hints on the last feature map.

``loss = CE(student, y) + beta * MSE(regressor(student_map), teacher_map)``, where the regressor is a
Conv1x1(C_s→C_t) + BN used only in training, and the larger of the two maps is average-pooled down to the
smaller (as in SimKD). The student runs once per step: its body's output feeds both the hint and its head.
The deployable is the plain student; training works on its fx body/head split, which runs on the very
same modules (see :func:`~kdpipe.stages.distillers.base.tie`), so the trained weights are the
deployable's without any copying.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdpipe.config import DistillConfig
from kdpipe.ml.data import Batch
from kdpipe.stages.distillers.base import (
    DISTILLERS,
    BodyHead,
    Built,
    DataInfo,
    Distiller,
    TeacherParts,
    labeled_ce,
    pool,
    spec_shapes,
    split_facts,
    teacher_split,
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
        hint = net.regressor(pool(features, spec["student_pool_to"]))
        target = pool(teacher["features"], spec["teacher_pool_to"]).to(hint.dtype)
        ce = labeled_ce(logits, batch.y, spec["label_smoothing"])  # the hint needs no label: every image
        return ce + spec["beta"] * F.mse_loss(hint, target)
