"""scratch: the student trained on the labels alone (no teacher), the baseline every method must beat.

Plain cross-entropy with ``distill.train.label_smoothing``, the same recipe, seed and initialisation as
the distilled students, on the labelled training images only (unlabelled ones, ``data.unlabeled``, have nothing to
teach it). The deployable is the plain student.
"""

from __future__ import annotations

import torch

from kdpipe.config import DistillConfig
from kdpipe.ml.data.memory import Batch
from kdpipe.stages.distillers.base import DISTILLERS, Built, DataInfo, Distiller, TeacherParts, labeled_ce


@DISTILLERS.register()
class Scratch(Distiller):
    name = "scratch"
    title = "scratch"
    signals = frozenset()

    def build(self, teacher: TeacherParts, student_arch: str, data: DataInfo, conf: DistillConfig) -> Built:
        model = data.create(student_arch, conf.student_kwargs)
        spec = {**self.base_spec(teacher, student_arch, data, conf), "label_smoothing": conf.train.label_smoothing}
        return Built(model=model, trainable=model, spec=spec)

    def loss(self, built: Built, batch: Batch, teacher: dict[str, torch.Tensor]) -> torch.Tensor:
        return labeled_ce(built.model(batch.x), batch.y, built.spec["label_smoothing"])
