"""Zipf's label smoothing (Liang et al., ECCV 2022): self-distillation with no teacher at all.

Per image, the student's own prediction ranks the classes (1 = most likely; ties share the best rank of the
tie), and the soft target over the non-target classes follows Zipf's law by that rank:

``q_k = r_k^(-power) / Σ_{j≠y} r_j^(-power)`` for every class k ≠ y (the labelled class is ranked with the others
but gets no target mass: it is trained by the cross-entropy), and

``loss = CE(z, y) + weight·KL(q ‖ softmax(z_{≠y}))``, the student's distribution renormalised over the
non-target classes. The ranks carry no gradient.

The rank source (``distill.zipf.rank``): ``dense`` (the paper's) applies the student's classifier at every
position of its last feature map and ranks the classes by how many positions vote for them (classes with as many
votes tie); ``logits`` ranks by the student's logits. Defaults (power 1, weight 0.1) are the authors' CIFAR recipe;
``only_correct`` restricts the term to images already classified correctly (their ``loss_mask``). Nothing is asked
of the teacher (``signals`` is empty): it never runs. The deployable is the plain student.
"""

from __future__ import annotations

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
    trained_split,
)
from kdpipe.stages.distillers.dkd import non_target


def min_ranks(scores: torch.Tensor) -> torch.Tensor:
    """1-based ranks of each row's scores, highest first; equal scores share the smallest rank of their tie
    (``scipy.stats.rankdata(-scores, method="min")``)."""
    descending = torch.sort(-scores, dim=1).values.contiguous()
    return torch.searchsorted(descending, (-scores).contiguous(), side="left") + 1


def zipf_targets(scores: torch.Tensor, labels: torch.Tensor, power: float) -> torch.Tensor:
    """The (N, K-1) soft targets over each row's non-target classes (in class order): Zipf by the rank of
    ``scores`` among all K classes, renormalised to sum to 1."""
    weights = min_ranks(scores).to(torch.float32).pow(-power)
    rest = non_target(weights, labels)
    return rest / rest.sum(1, keepdim=True)


def zipf_term(
    logits: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, power: float, only_correct: bool = False
) -> torch.Tensor:
    """``KL(q ‖ softmax(logits_{≠y}))`` with ``q = zipf_targets(scores)``, the batch mean (over the correctly
    classified images only with ``only_correct``; 0 when there are none)."""
    q = zipf_targets(scores.detach(), labels, power)
    log_p = F.log_softmax(non_target(logits.float(), labels), 1)
    kl = F.kl_div(log_p, q, reduction="none").sum(1)
    if not only_correct:
        return kl.mean()
    right = (logits.argmax(1) == labels).float()
    return (kl * right).sum() / right.sum().clamp_min(1)


def dense_votes(features: torch.Tensor, head: nn.Module, num_classes: int) -> torch.Tensor:
    """(N, K) counts of the positions of an (N, C, H, W) feature map where the classifier (``head`` run on each
    position's C values as a 1×1 map, in eval mode: no normalisation statistics move) picks each class."""
    n, c, h, w = features.shape
    was = head.training
    head.eval()
    try:
        with torch.no_grad():
            cells = features.detach().permute(0, 2, 3, 1).reshape(n * h * w, c, 1, 1)
            picks = head(cells).argmax(1).view(n, h * w)
    finally:
        head.train(was)
    votes = torch.zeros(n, num_classes, device=features.device)
    return votes.scatter_add_(1, picks, torch.ones_like(picks, dtype=votes.dtype))


@DISTILLERS.register()
class ZipfLS(Distiller):
    name = "zipf_ls"
    title = "Zipf's LS"
    signals = frozenset()

    def build(self, teacher: TeacherParts, student_arch: str, data: DataInfo, conf: DistillConfig) -> Built:
        z = conf.zipf
        student = data.create(student_arch, conf.student_kwargs)
        spec = {
            **self.base_spec(teacher, student_arch, data, conf),
            "weight": z.weight,
            "power": z.power,
            "rank": z.rank,
            "only_correct": z.only_correct,
            "label_smoothing": conf.train.label_smoothing,
        }
        if z.rank == "logits":
            return Built(model=student, trainable=student, spec=spec)
        s, body, head = trained_split(student, data, conf.student_feature_node, self.title)
        spec.update(student_feature_node=s.node, student_split_mode=s.mode, student_feature_shape=list(s.feature_shape))
        trainer = BodyHead(body, head)  # one forward: the feature map the votes are counted on, and the logits
        dense_votes(torch.zeros(2, *s.feature_shape), head, data.num_classes)  # fails now, not after other stages
        return Built(model=student, trainable=trainer, spec=spec)

    def loss(self, built: Built, batch: Batch, teacher: dict[str, torch.Tensor]) -> torch.Tensor:
        spec = built.spec
        if spec["rank"] == "logits":
            logits = built.model(batch.x)
            scores = logits
        else:
            net = built.trainable
            features = net.body(batch.x)
            logits = net.head(features)
            scores = dense_votes(features, net.head, logits.shape[1])
        ce = F.cross_entropy(logits, batch.y, label_smoothing=spec["label_smoothing"])
        return ce + spec["weight"] * zipf_term(logits, scores, batch.y, spec["power"], spec["only_correct"])
