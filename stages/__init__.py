"""The five stages, in the order they run. Importing this package registers them (and imports no torch)."""

from kdpipe.stages import benchmark, distill, export, features, teacher, validate  # noqa: F401 - registration
from kdpipe.stages.base import STAGES, Stage, StageContext, stage_order

ORDER = stage_order()  # teacher, features, distill, validate, export, benchmark

__all__ = ["ORDER", "STAGES", "Stage", "StageContext"]
