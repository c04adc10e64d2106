"""Latency measurement for ONNX files with onnxruntime.

Deliberately torch-free: the benchmark should measure the deployed runtime only, and importing torch would pull its
thread pools into the process. numpy and onnxruntime are imported inside the functions that need them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from pipeline.errors import UsageError


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


def summarize(latencies_ms: list[float], batch_size: int) -> dict:
    """Summary statistics of per-call latencies; percentiles use numpy's linear interpolation.

    ``throughput_ips`` is images per second: ``batch_size`` images per call at the mean latency.
    """
    import numpy as np

    if not latencies_ms:
        raise ValueError("summarize needs at least one latency")
    values = np.asarray(latencies_ms, dtype=np.float64)
    p50, p90, p95, p99 = np.percentile(values, [50, 90, 95, 99])
    mean = float(values.mean())
    return {
        "runs": int(values.size),
        "mean_ms": mean,
        "std_ms": float(values.std()),
        "min_ms": float(values.min()),
        "p50_ms": float(p50),
        "p90_ms": float(p90),
        "p95_ms": float(p95),
        "p99_ms": float(p99),
        "max_ms": float(values.max()),
        "throughput_ips": batch_size * 1000.0 / mean if mean > 0 else float("inf"),
    }


def benchmark_onnx(
    path: Path,
    input_shape: tuple[int, ...],
    batch_size: int,
    providers: list[str],
    intra_op_threads: int,
    warmup: int,
    min_runs: int,
    min_seconds: float,
    max_seconds: float,
    seed: int = 0,
) -> dict:
    """Benchmark ``session.run`` on the ONNX file at ``path`` with a fixed random input.

    Args:
        path: The ONNX file; its first input is fed.
        input_shape: Shape of one sample, without the batch axis.
        batch_size: Samples per call.
        providers: onnxruntime execution providers, in priority order. Each must be available here.
        intra_op_threads: ``SessionOptions.intra_op_num_threads`` (inter-op is fixed at 1).
        warmup, min_runs, min_seconds, max_seconds: See :func:`measure_session`.
        seed: Seed of the standard-normal float32 input.

    Returns:
        :func:`summarize`'s dict plus ``session_create_ms``, ``first_run_ms`` and ``provider`` (the provider the
        session actually uses first).

    Raises:
        UsageError: A requested provider is not available in this onnxruntime build.
    """
    import numpy as np
    import onnxruntime as ort

    available = ort.get_available_providers()
    for provider in providers:
        if provider not in available:
            raise UsageError(
                f"benchmark.providers: '{provider}' is not available here; available: {', '.join(available)}"
            )

    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL

    t0 = time.perf_counter_ns()
    session = ort.InferenceSession(str(path), sess_options=options, providers=list(providers))
    session_create_ms = (time.perf_counter_ns() - t0) / 1e6

    data = np.random.default_rng(seed).standard_normal((batch_size, *input_shape), dtype=np.float32)
    feed = {session.get_inputs()[0].name: data}

    def run() -> object:
        return session.run(None, feed)

    t0 = time.perf_counter_ns()
    run()
    first_run_ms = (time.perf_counter_ns() - t0) / 1e6

    latencies = measure_session(run, warmup, min_runs, min_seconds, max_seconds)
    return {
        **summarize(latencies, batch_size),
        "session_create_ms": session_create_ms,
        "first_run_ms": first_run_ms,
        "provider": session.get_providers()[0],
    }
