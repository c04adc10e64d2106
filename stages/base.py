"""What a stage is: a name, a version, the upstream stages it reads, and ``run``.

A stage reads only its inputs and writes only under ``ctx.out_dir``; the runner owns ordering,
caching, logging and progress. Stages never touch the cache.
"""

from __future__ import annotations

import abc
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from kdpipe.config import LoadedConfig
from kdpipe.fileio import FileDigests
from kdpipe.registry import Registry

METRICS = "metrics.json"


@dataclass
class StageContext:
    """What a running stage gets.

    Attributes:
        cfg: the whole validated config (a stage reads its own section and ``data``).
        inputs: upstream stage name → its committed artifact folder (read-only).
        out_dir: where the stage writes its artifacts.
        work_dir: scratch that survives a killed run (epoch checkpoints), deleted once the entry is committed.
    """

    cfg: LoadedConfig
    inputs: dict[str, Path]
    out_dir: Path
    work_dir: Path
    log: Callable[[str], None] = print
    progress: bool = True
    cache: dict[str, Any] = field(default_factory=dict)  # in-process memo shared by stages of one run
    key: str = ""  # this stage's cache key (stamped into exported files)


class Stage(abc.ABC):
    """Base class. Subclasses set ``name``, ``version``, ``needs`` and implement :meth:`run`."""

    name: ClassVar[str]
    version: ClassVar[int] = 1
    needs: ClassVar[tuple[str, ...]] = ()
    uses_data: ClassVar[bool] = False
    #: libraries whose versions shape this stage's result (part of its cache key)
    libraries: ClassVar[tuple[str, ...]] = ("torch",)

    def config(self, cfg: LoadedConfig) -> dict[str, Any]:
        """The config that shapes the result: the stage's section, plus ``data`` when it reads data."""
        section = {self.name: cfg.section(self.name)}
        if self.uses_data:
            section["data"] = cfg.section("data")
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

    @abc.abstractmethod
    def run(self, ctx: StageContext) -> dict[str, Any]:
        """Do the work, write artifacts under ``ctx.out_dir``, return the metrics (saved as metrics.json)."""


STAGES: Registry[type[Stage]] = Registry("stage")


def read_metrics(folder: Path) -> dict[str, Any]:
    return json.loads((folder / METRICS).read_text())
