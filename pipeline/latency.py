"""Latency measurement for ONNX files with onnxruntime.

Deliberately torch-free: the benchmark should measure the deployed runtime only, and importing torch would pull its
thread pools into the process. numpy and onnxruntime are imported inside the functions that need them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


def open_session(path: Path, providers: list[str], intra_op_threads: int) -> tuple[Any, float]:
    """An onnxruntime session (and its creation time in ms); a missing provider is bad input."""
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
    return session, (time.perf_counter_ns() - t0) / 1e6


def benchmark_models(
    paths: dict[str, Path],
    input_shape: tuple[int, ...],
    batch_sizes: list[int],
    providers: list[str],
    intra_op_threads: int,
    warmup: int,
    min_runs: int,
    min_seconds: float,
    max_seconds: float,
    rounds: int = 1,
    seed: int = 0,
    session_factory: Callable[[Path, list[str], int], tuple[Any, float]] = open_session,
    log: Callable[[str], None] | None = None,
) -> dict[str, dict[str, dict]]:
    """Benchmark several ONNX files in interleaved rounds: ``{name: {"batch_N": summary}}``.

    Each batch size is timed in ``rounds`` rounds; within a round every model gets ``min_runs / rounds`` calls (and
    ``min_seconds / rounds``, capped at ``max_seconds / rounds``), in an order that rotates from round to round. A
    burst of load on the machine thus hits every model alike (fair speed-ups), and the per-round medians
    (``round_p50_ms``) are the samples a noise-aware regression check resamples.
    """
    import numpy as np

    sessions = {name: session_factory(path, providers, intra_op_threads) for name, path in paths.items()}
    names = list(paths)
    rounds = max(1, rounds)
    per_runs = max(1, -(-min_runs // rounds))
    out: dict[str, dict[str, dict]] = {name: {} for name in names}
    for bs in batch_sizes:
        data = np.random.default_rng(seed).standard_normal((bs, *input_shape), dtype=np.float32)
        runners, first_ms = {}, {}
        for name, (session, _) in sessions.items():
            feed = {session.get_inputs()[0].name: data}
            runners[name] = lambda session=session, feed=feed: session.run(None, feed)
            t0 = time.perf_counter_ns()
            runners[name]()
            first_ms[name] = (time.perf_counter_ns() - t0) / 1e6
            for _ in range(max(0, warmup)):
                runners[name]()
        samples: dict[str, list[float]] = {name: [] for name in names}
        medians: dict[str, list[float]] = {name: [] for name in names}
        for r in range(rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                lat = measure_session(runners[name], 0, per_runs, min_seconds / rounds, max_seconds / rounds)
                samples[name] += lat
                medians[name].append(float(np.median(lat)))
        for name, (session, create_ms) in sessions.items():
            out[name][f"batch_{bs}"] = {
                **summarize(samples[name], bs),
                "session_create_ms": create_ms,
                "first_run_ms": first_ms[name],
                "provider": session.get_providers()[0],
                "rounds": rounds,
                "round_p50_ms": medians[name],
            }
            if log:
                log(f"benchmark {name} batch {bs}: p50 {out[name][f'batch_{bs}']['p50_ms']:.3f} ms")
    return out


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
    """Benchmark one ONNX file at one batch size (one round); see :func:`benchmark_models`.

    Raises:
        UsageError: A requested provider is not available in this onnxruntime build.
    """
    result = benchmark_models(
        {"model": path}, input_shape, [batch_size], providers, intra_op_threads, warmup, min_runs, min_seconds,
        max_seconds, rounds=1, seed=seed,
    )  # fmt: skip
    return result["model"][f"batch_{batch_size}"]
