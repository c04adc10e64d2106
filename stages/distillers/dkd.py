"""DKD (Zhao et al., CVPR 2022, "Decoupled Knowledge Distillation"): KD's KL split into two terms, reweighted.

With p = softmax(z / T) of teacher (ᵀ) and student (ˢ) and t the labelled class:

- ``b = [p_t, 1 - p_t]``, the target-vs-rest binary distribution; ``TCKD = KL(bᵀ ‖ bˢ)``;
- ``p̂ = softmax(z_{≠t} / T)``, the distribution among the non-target classes alone; ``NCKD = KL(p̂ᵀ ‖ p̂ˢ)``.

Hinton's KD is exactly ``TCKD + (1 - p_tᵀ)·NCKD`` per image: the non-target term is suppressed where the teacher
is confident, i.e. where it carries the most "dark knowledge". DKD frees the two weights:

``loss = CE(zˢ, y) + w(epoch)·T²·(alpha·TCKD + beta·NCKD)``, ``w = min(1, epoch / warmup)`` with the epoch counted
from 1 (a linear warm-up of the distillation terms; the paper: 20 of 240 epochs, alpha 1, beta 8, T 4).
Only the teacher's logits are needed, so a TorchScript teacher works. The deployable is the plain student.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdpipe.config import DistillConfig
from kdpipe.ml.data.memory import Batch
from kdpipe.stages.distillers.base import DISTILLERS, Built, DataInfo, Distiller, TeacherParts, labeled_ce


def non_target(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The (N, K-1) logits of every class but each row's labelled one, in class order."""
    keep = torch.ones_like(logits, dtype=torch.bool).scatter_(1, labels[:, None], False)
    return logits[keep].view(len(logits), -1)


def dkd_terms(
    student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(TCKD, NCKD) per image, each (N,), at temperature T (not yet scaled by T²); computed in float32 from
    log-probabilities, so no probability that underflows to 0 makes a NaN."""
    s, t = student.float() / temperature, teacher.float() / temperature
    target = torch.zeros_like(s, dtype=torch.bool).scatter_(1, labels[:, None], True)

    def binary(z: torch.Tensor) -> torch.Tensor:  # log [p_t, 1 - p_t], each from a log-sum-exp
        log_p = F.log_softmax(z, dim=1)
        rest = log_p.masked_fill(target, float("-inf")).logsumexp(1)
        return torch.stack([log_p[target], rest], 1)

    tckd = F.kl_div(binary(s), binary(t), reduction="none", log_target=True).sum(1)
    log_s, log_t = F.log_softmax(non_target(s, labels), 1), F.log_softmax(non_target(t, labels), 1)
    nckd = F.kl_div(log_s, log_t, reduction="none", log_target=True).sum(1)
    return tckd, nckd


def warmup_weight(epoch: int, warmup: int) -> float:
    """The distillation terms' weight during ``epoch`` (0-based): ``min(1, (epoch + 1) / warmup)``, 1 without
    warm-up."""
    return 1.0 if warmup <= 0 else min(1.0, (epoch + 1) / warmup)


def dkd_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    alpha: float,
    beta: float,
    weight: float = 1.0,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """``CE + weight·T²·mean(alpha·TCKD + beta·NCKD)`` on logits (N, K). An unlabelled image (label -1) is left out
    of the CE, and its two terms take the teacher's class as the target one."""
    targets = torch.where(labels >= 0, labels, teacher.argmax(1))
    tckd, nckd = dkd_terms(student, teacher, targets, temperature)
    ce = labeled_ce(student, labels, label_smoothing)
    return ce + weight * temperature**2 * (alpha * tckd + beta * nckd).mean()


@DISTILLERS.register()
class DKD(Distiller):
    name = "dkd"
    title = "DKD"
    signals = frozenset({"logits"})

    def build(self, teacher: TeacherParts, student_arch: str, data: DataInfo, conf: DistillConfig) -> Built:
        model = data.create(student_arch, conf.student_kwargs)
        d = conf.dkd
        spec = {
            **self.base_spec(teacher, student_arch, data, conf),
            "temperature": d.temperature,
            "alpha": d.alpha,
            "beta": d.beta,
            "warmup": d.warmup_epochs(conf.train.epochs),
            "label_smoothing": conf.train.label_smoothing,
        }
        return Built(model=model, trainable=model, spec=spec)

    def loss(self, built: Built, batch: Batch, teacher: dict[str, torch.Tensor]) -> torch.Tensor:
        spec = built.spec
        weight = warmup_weight(batch.epoch, spec["warmup"])
        return dkd_loss(built.model(batch.x), teacher["logits"], batch.y, spec["temperature"], spec["alpha"],
                        spec["beta"], weight, spec["label_smoothing"])  # fmt: skip
