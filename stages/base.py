"""What a stage is: a name, a version, the upstream stages it reads, and ``run``.

A stage reads only its inputs and writes only under ``ctx.out_dir``; the runner owns ordering,
caching, logging and progress. Stages never touch the cache. The order stages run in is derived from
what they read (``needs``) and the few "show this first" hints (``after``): see :func:`stage_order`.
"""

from __future__ import annotations

import abc
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from kdpipe.config import TEACHER, LoadedConfig, stage_instance
from kdpipe.errors import ConfigError
from kdpipe.fileio import FileDigests
from kdpipe.registry import Registry

METRICS = "metrics.json"


@dataclass
class StageContext:
    """What a running stage gets.

    Attributes:
        cfg: the whole validated config (a stage reads its own section, ``data`` and ``runtime``).
        stage: the running stage's name (``conf`` is its config section).
        inputs: upstream stage name → its committed artifact folder (read-only).
        out_dir: where the stage writes its artifacts.
        work_dir: scratch that survives a killed run (epoch checkpoints), deleted once the entry is committed.
        memo: objects shared by the stages of one run in this process (the loaded dataset); not the cache.
        key: this stage's cache key (stamped into exported files).
    """

    cfg: LoadedConfig
    stage: str
    inputs: dict[str, Path]
    out_dir: Path
    work_dir: Path
    log: Callable[[str], None] = print
    progress: bool = True
    memo: dict[str, Any] = field(default_factory=dict)
    key: str = ""

    @property
    def conf(self) -> Any:
        """The running stage's own config section (``cfg.config.<stage>``)."""
        return getattr(self.cfg.config, self.stage)

    @property
    def runtime(self) -> Any:
        """Result-neutral settings: device, threads, progress, amp, compile, nproc."""
        return self.cfg.config.runtime

    def data(self) -> Any:
        """The dataset and its splits ``(Dataset, Splits)``, loaded once per run and shared by its stages."""
        from kdpipe.ml.models.loading import stage_data

        return stage_data(self)

    def teachers(self, stage: str = "teacher") -> list[tuple[str, Path]]:
        """(name, committed folder) of every teacher's ``stage`` entry (``teacher`` or ``features``), in config
        order: ``[("teacher", inputs["teacher"])]`` for one teacher, else ``inputs["teacher:NAME"]`` of each."""
        if not self.cfg.several_teachers:
            return [(TEACHER, self.inputs[stage])]
        return [(name, self.inputs[stage_instance(stage, name)]) for name in self.cfg.teacher_names]

    def teacher_model(self) -> tuple[Any, list[tuple[str, Any, dict[str, Any]]]]:
        """The run's teacher: the one teacher, or the ensemble of several (the weighted mean of their logits,
        :class:`~kdpipe.ml.models.loading.Ensemble`); and (name, model, spec) of each teacher."""
        from kdpipe.ml.models.loading import load_teachers

        return load_teachers(self.teachers(), self.cfg.teacher_weights)


class Stage(abc.ABC):
    """Base class. Subclasses set ``name``, ``version``, ``needs`` and implement :meth:`run`."""

    name: ClassVar[str]
    version: ClassVar[int] = 1
    #: upstream stages whose artifacts this one reads (their keys are part of its key)
    needs: ClassVar[tuple[str, ...]] = ()
    #: stages that run first although their artifacts are not read (ordering only, not part of the key)
    after: ClassVar[tuple[str, ...]] = ()
    uses_data: ClassVar[bool] = False
    #: libraries whose versions shape this stage's result (part of its cache key)
    libraries: ClassVar[tuple[str, ...]] = ("torch",)
    #: with several teachers, the runner runs one instance of the stage per teacher (``teacher:NAME``), each seeing
    #: the config as a single-teacher run of that teacher does (:meth:`LoadedConfig.for_teacher`), with its own key
    per_teacher: ClassVar[bool] = False

    def config(self, cfg: LoadedConfig) -> dict[str, Any]:
        """The config that shapes the result: the stage's section, plus ``data`` when it reads data, plus the
        teachers' names and weights when there are several (stages that are not per teacher read all of them)."""
        section = {self.name: cfg.section(self.name)}
        if self.uses_data:
            section["data"] = cfg.section("data")
        if cfg.several_teachers and not self.per_teacher:
            section["teachers"] = [{"name": n, "weight": w} for n, w in zip(cfg.teacher_names, cfg.teacher_weights,
                                                                           strict=True)]  # fmt: skip
        return section

    def training_config(self, cfg: LoadedConfig, section: dict[str, Any]) -> dict[str, Any]:
        """For stages that train: data-parallel training changes the global batch, so it is part of the key
        (the same for ``runtime.nproc: N`` and N torchrun processes)."""
        if cfg.data_parallel_processes > 1:
            section["data_parallel_processes"] = cfg.data_parallel_processes
        return section

    def data_parallel(self, cfg: LoadedConfig) -> bool:
        """Whether every torchrun rank runs this stage (it trains); otherwise rank 0 alone runs it."""
        return False

    def external(self, cfg: LoadedConfig, memo: FileDigests) -> dict[str, Any]:
        """Fingerprints of files outside the config that shape the result (besides the dataset)."""
        return {}

    def check(self, cfg: LoadedConfig) -> None:
        """Raise a one-line :class:`~kdpipe.errors.ConfigError` for anything wrong that can be seen without
        running a stage (names, combinations, files). The runner calls it for every stage of the plan before the
        first stage runs, so a mistake never surfaces after hours of training."""
        return None

    @abc.abstractmethod
    def run(self, ctx: StageContext) -> dict[str, Any]:
        """Do the work, write artifacts under ``ctx.out_dir``, return the metrics (saved as metrics.json)."""


STAGES: Registry[type[Stage]] = Registry("stage")


def check_model_name(cfg: LoadedConfig, key: str, name: str) -> None:
    """A model name that builds: an unknown one is a ConfigError naming ``key``, before any stage runs.

    ``timm:`` names are looked up without building the model; a ``python:`` entry point is resolved against
    the config's folder and imported (not called).
    """
    from kdpipe.errors import UsageError
    from kdpipe.ml.models.teacher_build import check_model_ref
    from kdpipe.ml.models.zoo import create_model
    from kdpipe.registry import UnknownNameError

    try:
        if check_model_ref(name, cfg.base):
            return
        create_model(name, num_classes=2, in_channels=1)
    except UnknownNameError as exc:
        raise ConfigError(key, str(exc), cfg.source) from None
    except UsageError as exc:
        if isinstance(exc, ConfigError) or not name.startswith(("python:", "timm:")):
            raise
        raise ConfigError(key, str(exc), cfg.source) from None


def stage_order() -> tuple[str, ...]:
    """The registered stages in run order: every stage after the ones it ``needs`` or runs ``after``.

    Ties (none today: ``after`` makes the chain total) are broken by name, so the order never depends on
    import order.
    """
    deps = {name: set(STAGES.get(name).needs) | set(STAGES.get(name).after) for name in STAGES}
    for name, wanted in deps.items():
        unknown = wanted - set(deps)
        if unknown:
            raise ValueError(f"stage '{name}' needs unknown stage(s): {', '.join(sorted(unknown))}")
    order: list[str] = []
    while len(order) < len(deps):
        ready = sorted(n for n, d in deps.items() if n not in order and d <= set(order))
        if not ready:
            raise ValueError(f"stages depend on each other in a cycle: {sorted(set(deps) - set(order))}")
        order.append(ready[0])
    return tuple(order)


def read_metrics(folder: Path) -> dict[str, Any]:
    return json.loads((folder / METRICS).read_text())
