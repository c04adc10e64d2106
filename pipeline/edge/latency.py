"""Timing of any callable (the PyTorch eager reference), with the same statistics as the ONNX runner.

ONNX models are measured by ``kdpipe/edge/runner.py`` (the single-file runner an edge bundle carries);
this module shares its ``summarize`` so both report identical figures. No torch import here.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from kdpipe.edge.runner import summarize

__all__ = ["measure_session", "summarize"]


def measure_session(
    run: Callable[[], object],
    warmup: int,
    min_runs: int,
    min_seconds: float,
    max_seconds: float,
) -> list[float]:
    """Time repeated calls of ``run``.

    ``run`` is called ``warmup`` times untimed, then timed call by call until at least ``min_runs`` calls *and* at
    least ``min_seconds`` of timed calls have passed. ``max_seconds`` caps the timed phase regardless, but at least
    one call is always timed.

    Returns:
        Per-call latencies in milliseconds, in call order.
    """
    for _ in range(max(0, warmup)):
        run()
    min_ns = int(min_seconds * 1e9)
    max_ns = int(max_seconds * 1e9)
    latencies: list[float] = []
    started = time.perf_counter_ns()
    while True:
        t0 = time.perf_counter_ns()
        run()
        t1 = time.perf_counter_ns()
        latencies.append((t1 - t0) / 1e6)
        elapsed = t1 - started
        if elapsed >= max_ns or (len(latencies) >= min_runs and elapsed >= min_ns):
            return latencies
