"""Distillation methods, one file each, trained by the distill stage in the same harness.

A method (a :class:`Distiller` registered in :data:`DISTILLERS`) says which signals it needs from the
frozen teacher per batch (``signals``), builds what it trains (``build``), gives the loss of one batch
(``loss``) and rebuilds the deployable student from its saved spec alone (``rebuild``), so validate,
export and benchmark never need the teacher file. The stage owns the training loop, the teacher
signals (:class:`OnlineTeacher` runs the frozen teacher on every batch), resuming and model selection.
"""

from kdpipe.stages.distillers import crd, dkd, fitnet, kd, scratch, simkd, zipf  # noqa: F401 - registers the methods
from kdpipe.stages.distillers.base import (
    DISTILLERS,
    SIGNALS,
    STUDENT_SPEC,
    STUDENT_STATE,
    Built,
    DataInfo,
    Distiller,
    OnlineTeacher,
    TeacherParts,
    common_size,
    frozen_copy,
    load_student,
    pool,
    spec_shapes,
    split_student,
    teacher_split,
)

__all__ = [
    "DISTILLERS",
    "SIGNALS",
    "STUDENT_SPEC",
    "STUDENT_STATE",
    "Built",
    "DataInfo",
    "Distiller",
    "OnlineTeacher",
    "TeacherParts",
    "common_size",
    "frozen_copy",
    "load_student",
    "pool",
    "spec_shapes",
    "split_student",
    "teacher_split",
]
