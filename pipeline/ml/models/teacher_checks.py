"""Checks on a teacher before a student is distilled from it: is it any good, and is the student smaller?

Both catch silent failures measured on this project: a checkpoint teacher at 87% val accuracy scored 9.9%
with exit 0 when the normalisation was wrong, and with a narrow teacher (MobileNetV2) SimKD's projector made
the deployable "student" 4.6M parameters against the teacher's 0.7M.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from kdpipe.errors import ConfigError


def chance_ceiling(num_classes: int, n_val: int) -> float:
    """The val top-1 a chance-level classifier stays under: chance + 3 binomial standard errors (≥ 5 points)."""
    p = 1.0 / num_classes
    return p + max(0.05, 3 * math.sqrt(p * (1 - p) / max(1, n_val)))


def check_teacher_accuracy(
    val_top1: float, num_classes: int, n_val: int, describe: str, preprocessing: str, source: str | None
) -> None:
    """Refuse a loaded teacher that scores near chance on the val split (one line, exit 2).

    Args:
        val_top1: the teacher's val top-1, measured through its preprocessing.
        num_classes: classes of the data.
        n_val: val images it was measured on.
        describe: what the teacher is ("checkpoint t.pt for timm:resnet10t").
        preprocessing: the normalisation it was fed, and where from (named in the message).
    """
    ceiling = chance_ceiling(num_classes, n_val)
    if val_top1 >= ceiling:
        return
    raise ConfigError(
        "teacher",
        f"the loaded teacher ({describe}) scores {val_top1:.1%} val top-1 on {n_val} images, near chance "
        f"({1 / num_classes:.1%} for {num_classes} classes), fed inputs normalised with {preprocessing}; likely "
        "causes: the wrong normalisation (set teacher.preprocessing to the mean/std it was trained with), channel "
        "order (RGB vs BGR), class order (the data's classes sorted differently from its training labels), or the "
        "wrong checkpoint; set teacher.check_accuracy: false to distil from it anyway",
        source,
    )


def smallest_fitting_factor(
    fixed: int, teacher: int, projector_size: Callable[[int], int], max_factor: int, current: int
) -> int | None:
    """The smallest projector factor f ≥ ``current`` with ``fixed + projector_size(f) < teacher``; None if none."""
    for f in range(max(1, current), max_factor + 1):
        if fixed + projector_size(f) < teacher:
            return f
    return None


def size_verdict(
    breakdown: dict[str, int], teacher: int, fit_factor: int | None, factor: int | None, whose: str = "the teacher's"
) -> str | None:
    """A one-line account when the deployable student is not smaller than the teacher (``whose``: with several
    teachers, the smallest one's); None when it is."""
    total = breakdown["total"]
    if total < teacher:
        return None
    parts = " + ".join(f"{k} {v:,}" for k, v in breakdown.items() if k != "total")
    msg = (
        f"the deployable student has {total:,} parameters ({parts}), not fewer than {whose} {teacher:,} "
        f"({total / max(1, teacher):.2f}x)"
    )
    if factor is not None:
        if fit_factor is not None:
            msg += f"; distill.factor: {fit_factor} (now {factor}) would make the projector small enough"
        else:
            msg += "; no projector factor fits: the student body and the teacher's head alone are too large, "
            msg += "choose a smaller student"
    else:
        msg += "; choose a smaller student"
    return msg
