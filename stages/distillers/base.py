"""What every distillation method shares: the Distiller contract, its registry, the teacher signals, and
rebuilding a committed student."""

from __future__ import annotations

import abc
import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from kdpipe.config import DistillConfig
from kdpipe.errors import UsageError
from kdpipe.ml.data.memory import Batch
from kdpipe.ml.models.contract_split import contract_parts
from kdpipe.ml.models.loading import frozen
from kdpipe.ml.models.split import Split, split_model
from kdpipe.ml.models.weights import load_weights
from kdpipe.ml.models.zoo import count_parameters, create_model
from kdpipe.registry import Registry

SIGNALS = frozenset({"features", "logits"})
STUDENT_STATE = "student.pt"
STUDENT_SPEC = "student.json"


@dataclass(frozen=True)
class DataInfo:
    """What a student is built for: class count, input shape (C, H, W) and class names; ``train_index``, the
    training split's dataset indices (what ``Batch.index`` holds), for methods that keep state per training
    image (CRD's memory); None where only the shapes are known (checks before any stage runs)."""

    num_classes: int
    input_shape: tuple[int, int, int]
    classes: list[str]
    train_index: torch.Tensor | None = field(default=None, compare=False, repr=False)

    @property
    def in_channels(self) -> int:
        return self.input_shape[0]

    def example(self) -> torch.Tensor:
        """A zero batch of the input shape: what fx shape propagation runs on, once."""
        return torch.zeros(2, *self.input_shape)

    @property
    def image_size(self) -> int | tuple[int, int]:
        """What models built for one input size (ViTs) are built for: the data's (square) image size."""
        h, w = self.input_shape[1:]
        return h if h == w else (h, w)

    def create(self, arch: str, kwargs: dict[str, Any] | None = None) -> nn.Module:
        """A freshly initialised model ``arch`` for this data (zoo, ``torchvision:``, ``timm:`` or ``python:``)."""
        return create_model(
            arch, num_classes=self.num_classes, in_channels=self.in_channels, image_size=self.image_size, kwargs=kwargs
        )

    @classmethod
    def of_spec(cls, spec: dict[str, Any]) -> DataInfo:
        """The data a saved student was built for, from its spec."""
        return cls(spec["num_classes"], tuple(spec["input_shape"]), list(spec.get("classes", [])))  # type: ignore[arg-type]


@dataclass(frozen=True)
class TeacherParts:
    """The frozen teacher as a method sees it when building: its architecture name and, when some method
    of the run needs feature maps, its body/head split (``None`` otherwise, and for a TorchScript teacher).
    With several teachers, each has its ``name`` and its ``weight`` in the ensemble's average (normalised)."""

    arch: str | None
    split: Split | None
    kwargs: dict[str, Any] = field(default_factory=dict)
    name: str = "teacher"
    weight: float = 1.0


#: how a method learns from several teachers (:attr:`Distiller.ensemble`): each teacher's signals in turn, or the
#: weighted mean of their logits as one teacher's
EACH, MEAN_LOGITS = "each", "mean_logits"


@dataclass
class Built:
    """What :meth:`Distiller.build` returns.

    Attributes:
        model: the deployable student (images → logits); saved as ``student.pt``.
        trainable: what is optimised, checkpointed and selected on val; maps images → logits like ``model``
            and contains it (it may add training-only parts, e.g. FitNet's regressor).
        spec: JSON facts :meth:`Distiller.rebuild` needs (saved as ``student.json``) plus the hyper-parameters.
    """

    model: nn.Module
    trainable: nn.Module
    spec: dict[str, Any]


class Distiller(abc.ABC):
    """Base class of a distillation method. Subclasses set ``name``/``title``/``signals``, ``build`` and ``loss``."""

    name: ClassVar[str]
    title: ClassVar[str]
    #: what the method needs from the frozen teacher per batch: a subset of {"features", "logits"}
    signals: ClassVar[frozenset[str]] = frozenset()
    #: why it cannot use a TorchScript teacher (only read when "features" is in ``signals``)
    why_features: ClassVar[str] = "needs the teacher's last feature map"
    #: how it learns from several teachers: ``"each"`` (:meth:`build_many` builds it for all of them and
    #: :meth:`loss` gets each signal as a list, one per teacher), ``"mean_logits"`` (built and trained as for one
    #: teacher whose logits are the weighted mean of theirs), ``"none"`` (it cannot: refused before any stage);
    #: ``""``: ``"mean_logits"`` for a method that reads logits or nothing of the teacher, else ``"none"``
    ensemble: ClassVar[str] = ""

    @abc.abstractmethod
    def build(self, teacher: TeacherParts, student_arch: str, data: DataInfo, conf: DistillConfig) -> Built:
        """A freshly initialised student (the caller seeds the RNG first) and what trains it."""

    @abc.abstractmethod
    def loss(self, built: Built, batch: Batch, teacher: dict[str, torch.Tensor]) -> torch.Tensor:
        """The loss of one batch; ``teacher`` holds this batch's requested signals: ``features`` (N, C, H, W,
        not pooled) and/or ``logits``."""

    @classmethod
    def learns_from_unlabeled(cls) -> bool:
        """Whether a loss term works without labels (a term against the teacher's signals), so unlabelled training
        images (``data.unlabeled``) help; methods that ask the teacher for nothing (scratch, zipf_ls) train on the
        labelled images only."""
        return bool(cls.signals)

    @classmethod
    def ensemble_mode(cls) -> str:
        """How the method learns from several teachers: ``each``, ``mean_logits`` or ``none`` (see ``ensemble``)."""
        if cls.ensemble:
            return cls.ensemble
        return MEAN_LOGITS if cls.signals <= {"logits"} else "none"

    def build_many(self, teachers: list[TeacherParts], student_arch: str, data: DataInfo, conf: DistillConfig) -> Built:
        """A student of several teachers (methods whose ``ensemble`` is ``each``); its spec lists them."""
        raise NotImplementedError(f"{self.title} does not build for several teachers")

    def build_for(self, teachers: list[TeacherParts], student_arch: str, data: DataInfo, conf: DistillConfig) -> Built:
        """The student of one teacher (:meth:`build`) or of several (per :meth:`ensemble_mode`); a student of several
        has ``teachers`` in its spec (name, weight, architecture of each, in order)."""
        if len(teachers) == 1:
            return self.build(teachers[0], student_arch, data, conf)
        mode = self.ensemble_mode()
        if mode == "none":
            raise UsageError(f"distill.method: {self.name} {ENSEMBLE_REFUSAL}")
        built = (self.build_many if mode == EACH else self._build_merged)(teachers, student_arch, data, conf)
        built.spec.setdefault("teachers", teachers_spec(teachers))
        return built

    def _build_merged(
        self, teachers: list[TeacherParts], student_arch: str, data: DataInfo, conf: DistillConfig
    ) -> Built:
        return self.build(merged_parts(teachers), student_arch, data, conf)

    @classmethod
    def rebuild(cls, spec: dict[str, Any]) -> nn.Module:
        """The deployable student, freshly initialised, from its spec alone. Default: the plain student."""
        return DataInfo.of_spec(spec).create(spec["student_arch"], spec.get("student_kwargs"))

    def parameter_breakdown(self, built: Built) -> dict[str, int]:
        """Parameters of the deployable student (``total``, and its parts where it has some)."""
        n = count_parameters(built.model)
        return {"student": n, "total": n}

    def base_spec(
        self, teacher: TeacherParts, student_arch: str, data: DataInfo, conf: DistillConfig | None = None
    ) -> dict[str, Any]:
        return {
            "method": self.name,
            "student_arch": student_arch,
            "student_kwargs": dict(conf.student_kwargs) if conf else {},
            "teacher_arch": teacher.arch,
            "teacher_kwargs": dict(teacher.kwargs),
            "num_classes": data.num_classes,
            "in_channels": data.in_channels,
            "input_shape": list(data.input_shape),
            "classes": list(data.classes),
        }


DISTILLERS: Registry[type[Distiller]] = Registry("distillation method")

#: why a method whose ``ensemble`` is ``none`` is refused with several teachers (after "distill.method: NAME ")
ENSEMBLE_REFUSAL = (
    "cannot learn from several teachers (its terms pair the student with one teacher's features); with `teachers` "
    "use simkd, kd, fitnet, dkd, scratch or zipf_ls, or keep one teacher"
)


def merged_parts(teachers: list[TeacherParts]) -> TeacherParts:
    """Several teachers as one (``ARCH+ARCH+…``, no split): what a method trained on their mean logits is built for."""
    return TeacherParts("+".join(str(t.arch) for t in teachers), None, {})


def teachers_spec(teachers: list[TeacherParts]) -> list[dict[str, Any]]:
    """The teachers a student learned from, for its spec: name, weight and architecture of each, in order."""
    return [{"name": t.name, "weight": t.weight, "teacher_arch": t.arch, "teacher_kwargs": dict(t.kwargs)}
            for t in teachers]  # fmt: skip


def teacher_weights(spec: dict[str, Any]) -> list[float] | None:
    """The normalised weights of a several-teacher student's teachers (None for one teacher)."""
    return [float(t["weight"]) for t in spec["teachers"]] if spec.get("teachers") else None


def feature_node(spec: dict[str, Any], who: str) -> str | None:
    """The fx node a saved spec cut ``who`` (student/teacher) at; None where the model was cut through
    timm's contract (the node then names a method, re-found by :func:`~kdpipe.ml.models.split.split_model`)."""
    if spec.get(f"{who}_split_mode", "fx") != "fx":
        return None
    return spec.get(f"{who}_feature_node")


def split_facts(s: Split, t: Split) -> dict[str, Any]:
    """Where student and teacher were cut, for the spec: nodes and modes (see :class:`Split`)."""
    return {
        "student_feature_node": s.node,
        "teacher_feature_node": t.node,
        "student_split_mode": s.mode,
        "teacher_split_mode": t.mode,
    }


def split_student(model: nn.Module, data: DataInfo, node: str | None) -> Split:
    return split_model(model, data.example(), node, what="distill.student")


def tie(model: nn.Module, *parts: nn.Module, method: str = "this method") -> nn.Module:
    """Make ``model`` run on the very modules of ``parts`` (its fx split), so training them trains it.

    fx keeps the model's qualified module names in the split's GraphModules, so each module that holds
    parameters or buffers is put back into ``model`` under its own name; the check makes sure ``model``'s
    whole state is now the split's.
    """
    for part in parts:
        for name, module in part.named_modules():
            owns = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
            if name and owns and type(module) is not nn.Module:
                model.set_submodule(name, module)
    mine = {k: id(v) for k, v in model.state_dict(keep_vars=True).items()}
    theirs = {k: id(v) for part in parts for k, v in part.state_dict(keep_vars=True).items()}
    if mine != theirs:
        raise UsageError(
            f"distill.student: {method} trains the student through its body/head split, and this model's "
            "parameters do not all map onto it; use another student or method"
        )
    return model


def trained_split(
    student: nn.Module, data: DataInfo, node: str | None, method: str
) -> tuple[Split, nn.Module, nn.Module]:
    """The student's split and the body and head that train the student itself (no copy): an fx split is
    :func:`tie`d back into it, a split through timm's contract is a pair of views on it. For methods that read
    the student's last feature map and its logits from one forward (FitNet, CRD, Zipf's dense ranks)."""
    s = split_student(student, data, node)
    if s.mode == "fx":
        tie(student, s.body, s.head, method=method)
        return s, s.body, s.head
    body, head = contract_parts(student, s.mode)
    return s, body, head


class BodyHead(nn.Module):
    """The student as its body and head (from :func:`trained_split`: training them trains the student), for methods
    that read its last feature map and its logits from one forward; subclasses add training-only parts."""

    def __init__(self, body: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.body = body
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def teacher_split(teacher: TeacherParts, method: str) -> Split:
    if teacher.split is None:
        raise ValueError(f"{method} needs the teacher's body/head split")
    return teacher.split


def frozen_copy(module: nn.Module) -> nn.Module:
    """A frozen copy, so a student that embeds a teacher part never shares it with the running teacher."""
    return frozen(copy.deepcopy(module))


def common_size(s_hw: tuple[int, int], t_hw: tuple[int, int]) -> tuple[int, int]:
    """The smaller of the two spatial sizes: the larger map is average-pooled down to it."""
    return (min(s_hw[0], t_hw[0]), min(s_hw[1], t_hw[1]))


def spec_shapes(s_shape: tuple[int, int, int], t_shape: tuple[int, int, int]) -> dict[str, Any]:
    """The feature-map facts of a student/teacher pair: both shapes and what each map is pooled to (or None)."""
    size = common_size(s_shape[1:], t_shape[1:])  # type: ignore[arg-type]
    return {
        "student_feature_shape": list(s_shape),
        "teacher_feature_shape": list(t_shape),
        "student_pool_to": list(size) if tuple(size) != tuple(s_shape[1:]) else None,
        "teacher_pool_to": list(size) if tuple(size) != tuple(t_shape[1:]) else None,
    }


def pool(x: torch.Tensor, size: list[int] | tuple[int, int] | None) -> torch.Tensor:
    return x if size is None else F.adaptive_avg_pool2d(x, tuple(size))


def labeled_ce(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy with the labels over the batch's labelled images only (label -1: an unlabelled image,
    ``data.unlabeled``): their mean, and 0 (not NaN) for a batch without any. Every loss term that needs a label
    goes through it; terms against the teacher see every image."""
    labeled = labels >= 0
    if bool(labeled.all()):
        return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    per_image = F.cross_entropy(logits, labels.clamp_min(0), label_smoothing=label_smoothing, reduction="none")
    return (per_image * labeled).sum() / labeled.sum().clamp_min(1)


class OnlineTeacher:
    """Teacher signals computed on the fly: the frozen teacher runs (no grad) on every training batch.

    ``teacher_signals(batch) -> {"features": ..., "logits": ...}`` with only the requested keys; nothing
    runs when none is requested. Features come from the split's body (and logits from its head on those
    same features); logits alone come from the whole model, which may be a TorchScript module.
    """

    def __init__(
        self,
        model: nn.Module,
        split: Split | None,
        signals: frozenset[str],
        device: torch.device,
        channels_last: bool = False,
    ) -> None:
        unknown = set(signals) - SIGNALS
        if unknown:
            raise ValueError(f"unknown teacher signals {sorted(unknown)}; known: {sorted(SIGNALS)}")
        if "features" in signals and split is None:
            raise ValueError("teacher features need the teacher's body/head split")
        self.signals = frozenset(signals)
        features, logits = "features" in signals, "logits" in signals
        self.body = split.body if features and split else None
        self.head = split.head if features and logits and split else None
        self.model = model if logits and not features else None
        for part in (self.body, self.head, self.model):
            if part is not None:
                for p in part.parameters():
                    p.requires_grad_(False)
                part.eval().to(device)
                if channels_last:
                    part.to(memory_format=torch.channels_last)

    @torch.no_grad()
    def __call__(self, batch: Batch) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if self.body is not None:
            out["features"] = self.body(batch.x)
            if self.head is not None:
                out["logits"] = self.head(out["features"])
        elif self.model is not None:
            out["logits"] = self.model(batch.x)
        return out


class EnsembleSignals:
    """The signals of several teachers for one batch, from one source per teacher (:class:`OnlineTeacher` or the
    features stage's cache of each): for methods that take them one by one (``each``), every signal as a list in
    teacher order; for methods trained on the ensemble's logits (``mean_logits``), the weighted mean of the
    teachers' logits, as one teacher's."""

    def __init__(self, sources: list[Any], weights: list[float], mode: str) -> None:
        if mode not in (EACH, MEAN_LOGITS):
            raise ValueError(f"several teachers: unknown mode {mode!r}")
        self.sources, self.weights, self.mode = list(sources), list(weights), mode

    def __call__(self, batch: Batch) -> dict[str, Any]:
        outs = [source(batch) for source in self.sources]
        if self.mode == EACH:
            return {key: [out[key] for out in outs] for key in outs[0]}
        if "logits" not in outs[0]:
            return {}
        return {"logits": mean_logits([out["logits"] for out in outs], self.weights)}


def mean_logits(logits: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """``Σ wᵢ·logitsᵢ`` in float32 (the weights are normalised): the ensemble's logits."""
    out = weights[0] * logits[0].float()
    for w, x in zip(weights[1:], logits[1:], strict=True):
        out = out + w * x.float()
    return out


def load_student(folder: Path) -> tuple[nn.Module, dict[str, Any]]:
    """The deployable student committed by the distill stage, in eval mode, and its spec."""
    spec = json.loads((folder / STUDENT_SPEC).read_text())
    model = DISTILLERS.get(spec.get("method", "simkd")).rebuild(spec)
    model.load_state_dict(load_weights(folder / STUDENT_STATE, key="distill", source=str(folder)))
    return model.eval(), spec
