"""Gates: thresholds, one-line bad input, and noise-aware latency regression against a baseline."""

import copy
import random

import pytest

from kdpipe.config import BaselineConfig, GateConfig
from kdpipe.errors import UsageError
from kdpipe.reporting.gates import (
    bootstrap_ratio,
    compare_baseline,
    format_table,
    gate_name,
    parse_gate,
    recorded_gates,
    run_gates,
)


def lat(p50, rounds):
    return {"p50_ms": p50, "p90_ms": p50 * 1.1, "p99_ms": p50 * 1.3, "mean_ms": p50, "throughput_ips": 1000 / p50,
            "round_p50_ms": rounds}  # fmt: skip


REPORT = {
    "benchmark": {"intra_op_threads": 1},
    "models": {
        "teacher": {"parameters": 1000, "accuracy": {"top1": 0.92, "top5": 0.99},
                    "onnx": {"file_bytes": 4000, "parity": {"max_abs_diff": 1e-6, "top1_agreement": 1.0}},
                    "latency": {"batch_1": lat(2.0, [2.0] * 10)}},
        "student": {"parameters": 300, "accuracy": {"top1": 0.90, "top5": 0.99, "agreement_with_teacher": 0.95},
                    "onnx": {"file_bytes": 1200, "parity": {"max_abs_diff": 2e-6, "top1_agreement": 1.0}},
                    "latency": {"batch_1": lat(0.5, [0.5] * 10)}},
    },
}  # fmt: skip


@pytest.mark.parametrize(
    ("expr", "measured", "passed"),
    [
        ("student.top1 >= 0.88", 0.90, True),
        ("student.top1>=0.95", 0.90, False),
        ("student.top1_drop_vs_teacher <= 0.03", 0.02, True),
        ("student.top1_relative_drop_vs_teacher <= 0.01", 0.02 / 0.92, False),
        ("student.agreement_with_teacher >= 0.9", 0.95, True),
        ("student.p90_ms@1 <= 0.5", 0.55, False),
        ("student.speedup_p50@1 >= 3", 4.0, True),
        ("student.file_bytes <= 1000", 1200, False),
        ("student.parameters <= 300", 300, True),
        ("student.parity_max_abs_diff <= 1e-4", 2e-6, True),
    ],
)
def test_threshold_gates(expr, measured, passed):
    (verdict,) = run_gates(REPORT, [], [expr])
    assert verdict["measured"] == pytest.approx(measured) and verdict["passed"] is passed
    assert f"{verdict['measured']:.6g}" in verdict["detail"]


def test_table_names_the_failed_gate_with_both_figures():
    verdicts = run_gates(REPORT, [GateConfig(metric="top1", min=0.95)], ["student.top1 >= 0.5"])
    table = format_table(verdicts)
    assert "FAILED student.top1 >= 0.95: measured 0.9 misses >= 0.95" in table
    assert table.endswith("1 passed, 1 failed")


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ("student.bogus >= 1", "metric: must be one of"),
        ("pupil.top1 >= 1", "no model 'pupil' in the report; models: teacher, student"),
        ("student.p50_ms@64 <= 1", "the report has no such figure"),
        ("student.p50_ms <= 1", "latency metric 'p50_ms' needs batch_size"),
        ("student.top1 = 1", "expected MODEL.METRIC[@BATCH[:THREADS]] >= VALUE"),
    ],
)
def test_bad_gates_are_usage_errors(expr, message):
    with pytest.raises(UsageError, match=None) as info:
        run_gates(REPORT, [], [expr])
    assert message in str(info.value) and info.value.exit_code == 2


def test_thread_count_must_have_been_measured():
    gate = GateConfig(metric="p50_ms", batch_size=1, threads=4, max=1.0)
    with pytest.raises(UsageError, match=r"asks for 4 threads, the benchmark measured \[1\]"):
        run_gates(REPORT, [gate])


def test_latency_gate_at_another_thread_count_reads_the_matrix():
    report = copy.deepcopy(REPORT)
    report["benchmark"]["thread_counts"] = [1, 2]
    for name, p50_at_2 in (("teacher", 1.0), ("student", 0.25)):
        m = report["models"][name]
        m["latency"]["batch_1"].update(threads=1, provider="CPU")
        two = dict(m["latency"]["batch_1"], threads=2, batch_size=1, p50_ms=p50_at_2, p90_ms=p50_at_2 * 1.2)
        m["latency_matrix"] = [dict(m["latency"]["batch_1"], batch_size=1), two]
    (two,) = run_gates(report, [], ["student.p90_ms@1:2 <= 0.31"])
    assert two["measured"] == pytest.approx(0.3) and two["passed"] and two["name"] == "student.p90_ms@1:2 <= 0.31"
    (one,) = run_gates(report, [], ["student.p90_ms@1 <= 0.31"])
    assert one["measured"] == pytest.approx(0.55) and not one["passed"]
    (speedup,) = run_gates(report, [], ["student.speedup_p50@1:2 >= 1"])
    assert speedup["measured"] == pytest.approx(4.0)


def noisy(p50, n=10, seed=0, burst=False):
    rng = random.Random(seed)
    rounds = [p50 * rng.uniform(0.93, 1.07) for _ in range(n)]
    if burst:  # a busy neighbour slows two rounds a lot
        rounds[3] *= 1.8
        rounds[7] *= 1.6
    return rounds


def with_student_rounds(rounds, top1=0.90):
    r = copy.deepcopy(REPORT)
    r["models"]["student"]["latency"]["batch_1"] = lat(sorted(rounds)[len(rounds) // 2], rounds)
    r["models"]["student"]["accuracy"]["top1"] = top1
    return r


def test_same_model_remeasured_on_a_busy_machine_passes():
    base = with_student_rounds(noisy(0.5, seed=1))
    for seed in range(2, 8):
        again = with_student_rounds(noisy(0.5, seed=seed, burst=seed % 2 == 0))
        verdicts = compare_baseline(again, base, BaselineConfig())
        assert all(v["passed"] for v in verdicts), verdicts


def test_a_real_25_percent_slowdown_fails():
    base = with_student_rounds(noisy(0.5, seed=1))
    slower = with_student_rounds(noisy(0.625, seed=2, burst=True))
    (acc, latency) = compare_baseline(slower, base, BaselineConfig())
    assert acc["passed"] and not latency["passed"]
    assert latency["measured"] == pytest.approx(25, abs=6) and "CI" in latency["detail"]


def test_accuracy_drop_vs_baseline():
    base = with_student_rounds(noisy(0.5), top1=0.90)
    worse = with_student_rounds(noisy(0.5), top1=0.88)
    acc = compare_baseline(worse, base, BaselineConfig(max_latency_regression_pct=None))
    assert acc[0]["metric"] == "top1_drop_vs_baseline" and not acc[0]["passed"]


def test_bootstrap_interval_contains_the_point():
    point, lo, hi = bootstrap_ratio([1.0, 1.1, 0.9, 1.05], [1.0, 0.95, 1.02, 1.0], 0.95)
    assert lo <= point <= hi


def test_parse_gate_round_trip():
    g = parse_gate("student-int8.p99_ms@32 <= 4")
    assert (g.model, g.metric, g.batch_size, g.max) == ("student-int8", "p99_ms", 32, 4.0)


def test_recorded_gates_are_the_gates_a_report_was_judged_by():
    gates = [parse_gate(g) for g in ("student.top1 >= 0.9", "student.p90_ms@1:4 <= 2.5", "teacher.file_bytes <= 1e+06")]
    verdicts = [
        {"name": gate_name(g), "model": g.model, "metric": g.metric, "batch_size": g.batch_size,
         "threshold": g.min if g.min is not None else g.max, "op": ">=" if g.min is not None else "<="}
        for g in gates
    ]  # fmt: skip
    verdicts.append({"name": "student.p50_ms@1 vs baseline", "model": "student", "metric": "latency_regression_pct",
                     "batch_size": 1, "threshold": 10.0, "op": "<="})  # fmt: skip
    assert recorded_gates({"gates": verdicts}) == gates
    with pytest.raises(UsageError, match=r"r.json: recorded gate 'x' is unreadable: "):
        recorded_gates({"gates": [{"name": "x", "model": "student", "metric": "top1", "op": ">="}]}, "r.json")
