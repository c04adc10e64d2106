"""KD (Hinton et al., 2015): match the teacher's temperature-softened class probabilities.

``loss = (1 - alpha) * CE(student, y) + alpha * T² * KL(softmax(t / T) || softmax(s / T))``; the T²
keeps the soft term's gradients on the scale of the hard one when T changes. Only the teacher's logits
are needed, so a TorchScript teacher works. The deployable is the plain student with its own classifier.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdpipe.config import DistillConfig
from kdpipe.ml.data import Batch
from kdpipe.stages.distillers.base import DISTILLERS, Built, DataInfo, Distiller, TeacherParts, labeled_ce


def kd_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    alpha: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Hinton's loss on logits (N, K): ``(1-alpha)·CE + alpha·T²·KL(teacher ‖ student)`` at temperature T; the
    soft term over every image, the CE over the labelled ones (label -1: unlabelled; none computed at alpha 1)."""
    t = temperature
    soft = F.kl_div(F.log_softmax(student / t, dim=1), F.softmax(teacher.to(student.dtype) / t, dim=1),
                    reduction="batchmean")  # fmt: skip
    if alpha == 1:
        return t * t * soft
    hard = labeled_ce(student, labels, label_smoothing)
    return (1 - alpha) * hard + alpha * t * t * soft


@DISTILLERS.register()
class KD(Distiller):
    name = "kd"
    title = "KD"
    signals = frozenset({"logits"})

    def build(self, teacher: TeacherParts, student_arch: str, data: DataInfo, conf: DistillConfig) -> Built:
        model = data.create(student_arch, conf.student_kwargs)
        spec = {
            **self.base_spec(teacher, student_arch, data, conf),
            "temperature": conf.kd.temperature,
            "alpha": conf.kd.alpha,
            "label_smoothing": conf.train.label_smoothing,
        }
        return Built(model=model, trainable=model, spec=spec)

    def loss(self, built: Built, batch: Batch, teacher: dict[str, torch.Tensor]) -> torch.Tensor:
        spec = built.spec
        return kd_loss(built.model(batch.x), teacher["logits"], batch.y, spec["temperature"], spec["alpha"],
                       spec["label_smoothing"])  # fmt: skip
