"""KD (Hinton et al., 2015): match the teacher's temperature-softened class probabilities.

``loss = (1 - alpha) * CE(student, y) + alpha * T² * KL(softmax(t / T) || softmax(s / T))``; the T²
keeps the soft term's gradients on the scale of the hard one when T changes. Only the teacher's logits
are needed, so a TorchScript teacher works. The deployable is the plain student with its own classifier.
With several teachers the target is the weighted mean of their softened probabilities,
``Σ wᵢ·softmax(tᵢ / T)`` (weights normalised), in place of ``softmax(t / T)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdpipe.config import DistillConfig
from kdpipe.ml.data.memory import Batch
from kdpipe.stages.distillers.base import (
    DISTILLERS,
    Built,
    DataInfo,
    Distiller,
    TeacherParts,
    labeled_ce,
    merged_parts,
    teacher_weights,
)


def teacher_probabilities(
    teacher: torch.Tensor | list[torch.Tensor], temperature: float, dtype: torch.dtype, weights: list[float] | None
) -> torch.Tensor:
    """``softmax(t / T)``; for several teachers (a list of logits) the ``weights``-weighted mean of each one's."""
    if isinstance(teacher, torch.Tensor):
        return F.softmax(teacher.to(dtype) / temperature, dim=1)
    if weights is None or len(weights) != len(teacher):
        raise ValueError(f"{len(teacher)} teachers' logits need as many weights, got {weights}")
    probs = [w * F.softmax(t.to(dtype) / temperature, dim=1) for w, t in zip(weights, teacher, strict=True)]
    return torch.stack(probs).sum(0)


def kd_loss(
    student: torch.Tensor,
    teacher: torch.Tensor | list[torch.Tensor],
    labels: torch.Tensor,
    temperature: float,
    alpha: float,
    label_smoothing: float = 0.0,
    weights: list[float] | None = None,
) -> torch.Tensor:
    """Hinton's loss on logits (N, K): ``(1-alpha)·CE + alpha·T²·KL(teacher ‖ student)`` at temperature T; the
    soft term over every image, the CE over the labelled ones (label -1: unlabelled; none computed at alpha 1)."""
    t = temperature
    target = teacher_probabilities(teacher, t, student.dtype, weights)  # several teachers: their mean probabilities
    soft = F.kl_div(F.log_softmax(student / t, dim=1), target, reduction="batchmean")
    if alpha == 1:
        return t * t * soft
    hard = labeled_ce(student, labels, label_smoothing)
    return (1 - alpha) * hard + alpha * t * t * soft


@DISTILLERS.register()
class KD(Distiller):
    name = "kd"
    title = "KD"
    signals = frozenset({"logits"})
    ensemble = "each"  # several teachers: their softened probabilities averaged (not their logits)

    def build_many(self, teachers: list[TeacherParts], student_arch: str, data: DataInfo, conf: DistillConfig) -> Built:
        return self.build(merged_parts(teachers), student_arch, data, conf)

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
                       spec["label_smoothing"], weights=teacher_weights(spec))  # fmt: skip
