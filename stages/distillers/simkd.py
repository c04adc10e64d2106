"""SimKD (Chen et al., CVPR 2022): distillation with the reused teacher classifier.

The student's last feature map goes through a trainable projector to the teacher's channel count;
the loss is a single MSE between that and the teacher's last feature map; at inference the teacher's
own frozen pooling + classifier (its "head") classifies the projected student features. The deployed
student is ``head(projector(student_body(x)))``, so the projector and the head are part of its size.

With several teachers the student has a projector per teacher and every teacher's frozen head, and classifies with
the weighted mean of their logits, ``Σᵢ wᵢ·headᵢ(projectorᵢ(body(x)))`` (weights normalised); the loss is the
weighted mean of each projector's MSE against its own teacher's map. It is still one module and one ONNX graph.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdpipe.config import DistillConfig
from kdpipe.ml.data.memory import Batch
from kdpipe.ml.models.split import split_model
from kdpipe.ml.models.zoo import count_parameters
from kdpipe.stages.distillers.base import (
    DISTILLERS,
    Built,
    DataInfo,
    Distiller,
    TeacherParts,
    common_size,
    feature_node,
    frozen_copy,
    labeled_ce,
    merged_parts,
    pool,
    spec_shapes,
    split_facts,
    split_student,
    teacher_split,
    teacher_weights,
    teachers_spec,
)
from kdpipe.stages.distillers.kd import kd_loss


def simkd_terms(conf: DistillConfig) -> dict[str, Any]:
    """The spec's loss weights: SimKD's MSE alone (``paper``) or with terms through the reused head."""
    ce_weight, kd_weight = conf.simkd.weights()
    return {
        "preset": conf.simkd.preset,
        "ce_weight": ce_weight,
        "kd_weight": kd_weight,
        "temperature": conf.simkd.temperature,
        "label_smoothing": conf.train.label_smoothing,
    }


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


class EnsembleSimKDStudent(SimKDStudent):
    """The deployable student of several teachers: one student body, a projector and the frozen head of each teacher
    (``projector`` and ``head`` are lists, in teacher order), and the weighted mean of the heads' logits:
    ``Σᵢ wᵢ·headᵢ(projectorᵢ(pool(body(x))))``, weights normalised. One module, so one ONNX graph."""

    def __init__(
        self,
        body: nn.Module,
        projectors: list[nn.Module],
        heads: list[nn.Module],
        pools: list[Any],
        weights: list[float],
    ) -> None:
        nn.Module.__init__(self)
        self.body = body
        self.projector = nn.ModuleList(projectors)
        self.head = nn.ModuleList(heads)
        self.pool_to = [tuple(p) if p else None for p in pools]  # type: ignore[assignment]
        self.weights = [float(w) for w in weights]
        for p in self.head.parameters():
            p.requires_grad_(False)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:  # type: ignore[override]
        """The student's features projected into each teacher's feature space, in teacher order."""
        f = self.body(x)
        return [projector(pool(f, size)) for projector, size in zip(self.projector, self.pool_to, strict=True)]

    def logits(self, maps: list[torch.Tensor]) -> torch.Tensor:
        """Each teacher's head on its map, weighted and summed: the ensemble's logits."""
        out = self.weights[0] * self.head[0](maps[0])
        for w, head, m in zip(self.weights[1:], list(self.head)[1:], maps[1:], strict=True):
            out = out + w * head(m)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(self.features(x))


def projector_size(spec: dict[str, Any], factor: int) -> int:
    """Parameters of a SimKD student's projector (every teacher's, with several) at bottleneck ``factor``."""
    s_c = spec["student_feature_shape"][0]
    each = spec.get("teachers") or [spec]
    return sum(projector_parameters(s_c, f["teacher_feature_shape"][0], factor, f.get("projector_kernel", 3))
               for f in each)  # fmt: skip


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
    ensemble = "each"  # several teachers: a projector and the frozen head of each, their logits averaged

    def build(self, teacher: TeacherParts, student_arch: str, data: DataInfo, conf: DistillConfig) -> Built:
        student = data.create(student_arch, conf.student_kwargs)
        s = split_student(student, data, conf.student_feature_node)
        t = teacher_split(teacher, self.title)
        spec = {
            **self.base_spec(teacher, student_arch, data, conf),
            **split_facts(s, t),
            "factor": conf.factor,
            **spec_shapes(s.feature_shape, t.feature_shape),
            **simkd_terms(conf),
        }
        spec["projector_kernel"] = projector_kernel(s.feature_shape, t.feature_shape)
        spec["projector_final_relu"] = teacher_nonnegative(t.body, data.input_shape)
        projector = Projector(
            s.feature_shape[0], t.feature_shape[0], conf.factor, spec["projector_kernel"], spec["projector_final_relu"]
        )
        model = SimKDStudent(s.body, projector, frozen_copy(t.head), spec["student_pool_to"])
        return Built(model=model, trainable=model, spec=spec)

    def loss(self, built: Built, batch: Batch, teacher: dict[str, Any]) -> torch.Tensor:
        """The MSE; with several teachers (a list of their maps) the weighted mean of each projector's MSE against
        its teacher's map, and the optional terms on the ensemble's logits."""
        spec, model = built.spec, built.model
        several = isinstance(model, EnsembleSimKDStudent)
        projected = model.features(batch.x) if several else [model.features(batch.x)]
        maps = teacher["features"] if several else [teacher["features"]]
        sizes = [f["teacher_pool_to"] for f in spec["teachers"]] if several else [spec["teacher_pool_to"]]
        targets = [pool(m, size).to(p.dtype) for m, size, p in zip(maps, sizes, projected, strict=True)]
        weights = teacher_weights(spec) if several else [1.0]
        loss = sum(w * F.mse_loss(p, t) for w, p, t in zip(weights, projected, targets, strict=True))
        ce_weight, kd_weight = spec.get("ce_weight", 0.0), spec.get("kd_weight", 0.0)
        if not (ce_weight or kd_weight):
            return loss  # the paper's loss, exactly

        def classify(features: list[torch.Tensor]) -> torch.Tensor:
            return model.logits(features) if several else model.head(features[0])

        logits = classify(projected)
        if ce_weight:
            loss = loss + ce_weight * labeled_ce(logits, batch.y, spec.get("label_smoothing", 0.0))
        if kd_weight:
            with torch.no_grad():
                teacher_logits = classify(targets)
            loss = loss + kd_weight * kd_loss(logits, teacher_logits, batch.y, spec["temperature"], alpha=1.0)
        return loss

    def build_many(self, teachers: list[TeacherParts], student_arch: str, data: DataInfo, conf: DistillConfig) -> Built:
        """One student body; a projector and a frozen copy of the head of each teacher (an EnsembleSimKDStudent)."""
        student = data.create(student_arch, conf.student_kwargs)
        s = split_student(student, data, conf.student_feature_node)
        each, projectors, heads = [], [], []
        for parts in teachers:
            t = teacher_split(parts, self.title)
            facts = {
                **teachers_spec([parts])[0],
                "teacher_feature_node": t.node,
                "teacher_split_mode": t.mode,
                **spec_shapes(s.feature_shape, t.feature_shape),
                "projector_kernel": projector_kernel(s.feature_shape, t.feature_shape),
                "projector_final_relu": teacher_nonnegative(t.body, data.input_shape),
            }
            each.append(facts)
            projectors.append(Projector(s.feature_shape[0], t.feature_shape[0], conf.factor, facts["projector_kernel"],
                                        facts["projector_final_relu"]))  # fmt: skip
            heads.append(frozen_copy(t.head))
        spec = {
            **self.base_spec(merged_parts(teachers), student_arch, data, conf),
            "student_feature_node": s.node,
            "student_split_mode": s.mode,
            "student_feature_shape": list(s.feature_shape),
            "factor": conf.factor,
            **simkd_terms(conf),
            "teachers": each,
        }
        pools = [f["student_pool_to"] for f in each]
        model = EnsembleSimKDStudent(s.body, projectors, heads, pools, [t.weight for t in teachers])
        return Built(model=model, trainable=model, spec=spec)

    @classmethod
    def rebuild(cls, spec: dict[str, Any]) -> SimKDStudent:
        """The teacher head is rebuilt from the teacher *architecture*; its weights come with student.pt. With
        several teachers, each one's head and projector from its entry in the spec's ``teachers``."""
        data = DataInfo.of_spec(spec)
        s = split_model(
            data.create(spec["student_arch"], spec.get("student_kwargs")),
            data.example(),
            feature_node(spec, "student"),
            what="distill.student",
        )
        projectors, heads = [], []
        for facts in spec.get("teachers") or [spec]:
            t = split_model(
                data.create(facts["teacher_arch"], facts.get("teacher_kwargs")),
                data.example(),
                feature_node(facts, "teacher"),
                what="teacher.arch",
            )
            kernel = facts.get("projector_kernel", 3)  # students saved before token teachers: always 3×3, final ReLU
            relu = facts.get("projector_final_relu", True)
            projectors.append(Projector(s.feature_shape[0], t.feature_shape[0], spec["factor"], kernel, relu))
            heads.append(t.head)
        if not spec.get("teachers"):
            return SimKDStudent(s.body, projectors[0], heads[0], spec["student_pool_to"])
        pools, weights = [f["student_pool_to"] for f in spec["teachers"]], teacher_weights(spec) or []
        return EnsembleSimKDStudent(s.body, projectors, heads, pools, weights)

    def parameter_breakdown(self, built: Built) -> dict[str, int]:
        return built.model.parameter_breakdown()
