"""Baseline gating on measurements by the edge runner's own loop of a session test double: re-measured passes,
25% slower fails. The double advances a virtual clock (its cost plus seeded noise), so the verdicts do not depend
on how busy the machine is."""

import random
import types

import pytest

from kdpipe.config import BaselineConfig
from kdpipe.edge import runner as edge_runner
from kdpipe.reporting.gates import compare_baseline


class VirtualClock:
    def __init__(self) -> None:
        self.ns = 0

    def perf_counter_ns(self) -> int:
        return self.ns


class SleepySession:
    """Stands in for an onnxruntime session whose run takes ``ms`` milliseconds, give or take 3% (seeded)."""

    def __init__(self, ms: float, clock: VirtualClock, seed: int) -> None:
        self.ms, self.clock, self.rng = ms, clock, random.Random(seed)

    def get_inputs(self):
        return [type("Input", (), {"name": "input", "shape": ["batch", 1, 4, 4]})()]

    def run(self, outputs, feed):
        self.clock.ns += int(self.ms * 1e6 * max(0.5, self.rng.gauss(1.0, 0.03)))
        return [feed["input"]]


def measured_report(monkeypatch: pytest.MonkeyPatch, ms: float, seed: int = 0) -> dict:
    """A report whose student latency is measured by the edge runner's own loop on a sleeping session."""
    clock = VirtualClock()
    monkeypatch.setattr(edge_runner, "time", types.SimpleNamespace(perf_counter_ns=clock.perf_counter_ns))
    double = SleepySession(ms, clock, seed)
    monkeypatch.setattr(edge_runner, "open_session", lambda path, provider, threads, session=None: double)
    (cell,) = edge_runner.measure_cell("student.onnx", (1, 4, 4), [1], warmup=1, min_runs=40, min_seconds=0.0,
                                       max_seconds=5.0, rounds=10)  # fmt: skip
    return {"models": {"student": {"accuracy": {"top1": 0.9}, "latency": {"batch_1": cell}}}}


def test_remeasured_passes_and_25_percent_slower_fails(monkeypatch):
    conf = BaselineConfig(max_top1_drop=None, max_latency_regression_pct=10)
    baseline = measured_report(monkeypatch, 4.0)
    assert len(baseline["models"]["student"]["latency"]["batch_1"]["round_p50_ms"]) == 10
    (same,) = compare_baseline(measured_report(monkeypatch, 4.0, seed=1), baseline, conf)
    assert same["passed"], same["detail"]
    (slower,) = compare_baseline(measured_report(monkeypatch, 5.0, seed=2), baseline, conf)
    assert not slower["passed"], slower["detail"]
