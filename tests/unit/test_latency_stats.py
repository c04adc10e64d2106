"""Unit tests for kdpipe.edge.latency's statistics and timing loop (no onnxruntime session needed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kdpipe.edge.latency import measure_session, summarize


def test_latency_module_does_not_import_torch() -> None:
    code = "import sys, kdpipe.edge.latency; assert 'torch' not in sys.modules, 'torch was imported'"
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True)


def test_summarize_known_values() -> None:
    values = [float(v) for v in range(1, 101)]
    stats = summarize(values, batch_size=8)
    assert stats["runs"] == 100
    assert stats["mean_ms"] == pytest.approx(50.5)
    assert stats["std_ms"] == pytest.approx(float(np.std(values)))
    assert stats["min_ms"] == 1.0
    assert stats["max_ms"] == 100.0
    assert stats["p50_ms"] == pytest.approx(50.5)
    assert stats["p90_ms"] == pytest.approx(float(np.percentile(values, 90)))
    assert stats["p95_ms"] == pytest.approx(float(np.percentile(values, 95)))
    assert stats["p99_ms"] == pytest.approx(float(np.percentile(values, 99)))
    assert stats["throughput_ips"] == pytest.approx(8 * 1000 / 50.5)
    assert set(stats) == {
        "runs",
        "mean_ms",
        "std_ms",
        "min_ms",
        "p50_ms",
        "p90_ms",
        "p95_ms",
        "p99_ms",
        "max_ms",
        "throughput_ips",
    }


def test_summarize_single_value() -> None:
    stats = summarize([2.0], batch_size=1)
    assert stats["runs"] == 1
    assert stats["p50_ms"] == stats["p99_ms"] == 2.0
    assert stats["std_ms"] == 0.0
    assert stats["throughput_ips"] == pytest.approx(500.0)


def test_summarize_empty_raises() -> None:
    with pytest.raises(ValueError):
        summarize([], batch_size=1)


class _Counter:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1


def test_measure_session_warmup_not_timed_and_min_runs() -> None:
    run = _Counter()
    latencies = measure_session(run, warmup=3, min_runs=7, min_seconds=0.0, max_seconds=60.0)
    assert len(latencies) == 7
    assert run.calls == 3 + 7
    assert all(v >= 0.0 for v in latencies)


def test_measure_session_max_seconds_caps_runs() -> None:
    run = _Counter()
    latencies = measure_session(run, warmup=0, min_runs=10**9, min_seconds=3600.0, max_seconds=0.05)
    assert 1 <= len(latencies) < 10**9
    assert run.calls == len(latencies)


def test_measure_session_always_times_one_run() -> None:
    run = _Counter()
    latencies = measure_session(run, warmup=2, min_runs=0, min_seconds=0.0, max_seconds=0.0)
    assert len(latencies) == 1
    assert run.calls == 3


def test_measure_session_min_seconds_extends_past_min_runs() -> None:
    run = _Counter()
    latencies = measure_session(run, warmup=0, min_runs=1, min_seconds=0.02, max_seconds=60.0)
    assert len(latencies) >= 1
    assert run.calls == len(latencies)
