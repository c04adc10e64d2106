"""Gates: hard pass/fail checks on a report, and a noise-aware regression check against a baseline report.

A gate names a metric of one model (``student.top1 >= 0.88``, ``student.p90_ms@1 <= 2.0``); every
verdict carries the measured figure and the threshold. Latency regressions against a baseline are
decided on a bootstrap confidence interval of the ratio of medians over measurement rounds, so that
the same model measured twice on a busy machine passes while a real slowdown fails.
"""

from __future__ import annotations

import random
import re
import statistics
from typing import Any

from pydantic import ValidationError

from kdpipe.config import BaselineConfig, GateConfig, first_error
from kdpipe.errors import UsageError

ACCURACY = {"top1", "top5", "agreement_with_teacher"}
DROPS = {"top1_drop_vs_teacher", "top1_relative_drop_vs_teacher"}
LATENCY = {"mean_ms", "p50_ms", "p90_ms", "p95_ms", "p99_ms", "throughput_ips", "speedup_p50"}
SIZE = {"file_bytes", "parameters"}
PARITY = {"parity_max_abs_diff", "parity_top1_agreement"}
METRICS = sorted(ACCURACY | DROPS | LATENCY | SIZE | PARITY)
EXPRESSION = re.compile(
    r"^\s*(?P<model>[\w-]+)\.(?P<metric>\w+)(?:@(?P<batch>\d+)(?::(?P<threads>\d+))?)?\s*(?P<op>>=|<=)\s*"
    r"(?P<value>[-+0-9.eE]+)\s*$"
)


def parse_gate(text: str) -> GateConfig:
    """``MODEL.METRIC[@BATCH[:THREADS]] >= VALUE`` (or ``<=``) → a gate; bad text is a one-line usage error."""
    m = EXPRESSION.match(text)
    if not m:
        raise UsageError(
            f"--gate '{text}': expected MODEL.METRIC[@BATCH[:THREADS]] >= VALUE, e.g. 'student.p90_ms@1 <= 2.5'"
        )
    bound = "min" if m["op"] == ">=" else "max"
    data = {"model": m["model"], "metric": m["metric"], bound: float(m["value"])}
    if m["batch"]:
        data["batch_size"] = int(m["batch"])
    if m["threads"]:
        data["threads"] = int(m["threads"])
    try:
        return GateConfig.model_validate(data)
    except ValidationError as exc:
        key, msg = first_error(exc, GateConfig)
        raise UsageError(f"--gate '{text}': {key}: {msg}" if key else f"--gate '{text}': {msg}") from None


def recorded_gates(report: dict[str, Any], where: str = "the report") -> list[GateConfig]:
    """The threshold gates a report was judged by (its ``gates`` verdicts), to judge it again where the run's config
    is not at hand (a CI artifact on another machine). Baseline comparisons are left out: they need the baseline."""
    out = []
    for verdict in report.get("gates") or []:
        if verdict.get("metric") not in METRICS:  # top1_drop_vs_baseline, latency_regression_pct
            continue
        match = EXPRESSION.match(str(verdict.get("name", "")))
        bound = "min" if verdict.get("op") == ">=" else "max"
        data = {
            "model": verdict.get("model"),
            "metric": verdict["metric"],
            "batch_size": verdict.get("batch_size"),
            "threads": int(match["threads"]) if match and match["threads"] else None,
            bound: verdict.get("threshold"),
        }
        try:
            out.append(GateConfig.model_validate(data))
        except ValidationError as exc:
            key, msg = first_error(exc, GateConfig)
            raise UsageError(f"{where}: recorded gate {verdict.get('name')!r} is unreadable: {key}: {msg}") from None
    return out


def gate_name(g: GateConfig) -> str:
    batch = f"@{g.batch_size}" if g.batch_size else ""
    batch += f":{g.threads}" if g.batch_size and g.threads else ""
    op, value = (">=", g.min) if g.min is not None else ("<=", g.max)
    return f"{g.model}.{g.metric}{batch} {op} {value:g}"


def measure(report: dict[str, Any], g: GateConfig) -> float:
    """The figure a gate checks, read from the report; an unknown model or missing figure is bad input."""
    models = report.get("models", {})
    if g.model not in models:
        raise UsageError(f"gate '{gate_name(g)}': no model '{g.model}' in the report; models: {', '.join(models)}")
    m = models[g.model]
    try:
        if g.metric in ACCURACY:
            return float(m["accuracy"][g.metric])
        if g.metric in DROPS:
            teacher = float(models["teacher"]["accuracy"]["top1"])
            drop = teacher - float(m["accuracy"]["top1"])
            return drop if g.metric == "top1_drop_vs_teacher" else drop / teacher
        if g.metric in SIZE:
            return float(m["onnx"]["file_bytes"] if g.metric == "file_bytes" else m["parameters"])
        if g.metric in PARITY:
            return float(m["onnx"]["parity"][g.metric.removeprefix("parity_")])
        if g.metric == "speedup_p50":
            return _cell(report, "teacher", g)["p50_ms"] / _cell(report, g.model, g)["p50_ms"]
        return float(_cell(report, g.model, g)[g.metric])
    except (KeyError, TypeError, ValueError, ZeroDivisionError, StopIteration):  # an edited or partial report
        raise UsageError(
            f"gate '{gate_name(g)}': the report has no such figure (was the stage that measures it run"
            f"{', with this batch size' if g.batch_size else ''}{' and thread count' if g.threads else ''}?)"
        ) from None


def _cell(report: dict[str, Any], model: str, g: GateConfig) -> dict[str, Any]:
    """The latency figures of ``model`` at the gate's batch size: the headline cell, or with ``threads``
    the benchmark-matrix cell of the headline provider at that thread count."""
    m = report["models"][model]
    headline = m["latency"][f"batch_{g.batch_size}"]
    if g.threads is None or headline.get("threads", g.threads) == g.threads:
        return headline
    provider = headline.get("provider")
    return next(
        c for c in m.get("latency_matrix", [])
        if c["threads"] == g.threads and c["batch_size"] == g.batch_size and c.get("provider") == provider
    )  # fmt: skip


def check_threads(report: dict[str, Any], g: GateConfig) -> None:
    """A latency gate at a thread count the benchmark did not measure is bad input."""
    if g.threads is None or g.metric not in LATENCY:
        return
    bench = report.get("benchmark") or {}
    measured = bench.get("thread_counts") or [bench.get("intra_op_threads")]
    if g.threads not in measured:
        raise UsageError(
            f"gate '{gate_name(g)}': asks for {g.threads} threads, the benchmark measured {measured}; "
            "add it to benchmark.intra_op_threads"
        )


def evaluate(report: dict[str, Any], gates: list[GateConfig]) -> list[dict[str, Any]]:
    """Verdicts of threshold gates, in order."""
    out = []
    for g in gates:
        check_threads(report, g)
        value = measure(report, g)
        threshold = g.min if g.min is not None else g.max
        passed = value >= threshold if g.min is not None else value <= threshold  # type: ignore[operator]
        op = ">=" if g.min is not None else "<="
        out.append(
            {
                "name": gate_name(g),
                "model": g.model,
                "metric": g.metric,
                "batch_size": g.batch_size,
                "threshold": threshold,
                "op": op,
                "measured": value,
                "passed": passed,
                "detail": f"measured {value:.6g} {'meets' if passed else 'misses'} {op} {threshold:g}",
            }
        )
    return out


def bootstrap_ratio(
    current: list[float], baseline: list[float], confidence: float, resamples: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """Ratio of medians current/baseline with a percentile bootstrap interval (round medians resampled)."""
    rng = random.Random(seed)
    point = statistics.median(current) / statistics.median(baseline)
    ratios = sorted(
        statistics.median(rng.choices(current, k=len(current)))
        / statistics.median(rng.choices(baseline, k=len(baseline)))
        for _ in range(resamples)
    )
    tail = (1 - confidence) / 2
    lo = ratios[int(tail * (resamples - 1))]
    hi = ratios[int((1 - tail) * (resamples - 1))]
    return point, lo, hi


def compare_baseline(report: dict[str, Any], baseline: dict[str, Any], conf: BaselineConfig) -> list[dict[str, Any]]:
    """Accuracy drop and latency regression of each model against the baseline report; a figure that is missing
    or not a number in either report is bad input."""
    try:
        return _compare_baseline(report, baseline, conf)
    except (KeyError, TypeError, ValueError, ZeroDivisionError, statistics.StatisticsError) as exc:
        raise UsageError(
            f"baseline gate: a figure is missing or not a number in the baseline or this report ({type(exc).__name__}:"
            f" {exc})"
        ) from None


def _compare_baseline(report: dict[str, Any], baseline: dict[str, Any], conf: BaselineConfig) -> list[dict[str, Any]]:
    out = []
    for name in conf.models:
        cur, old = report.get("models", {}).get(name), baseline.get("models", {}).get(name)
        if cur is None or old is None:
            where = "report" if cur is None else "baseline"
            raise UsageError(f"baseline gate: no model '{name}' in the {where}")
        if conf.max_top1_drop is not None:
            drop = old["accuracy"]["top1"] - cur["accuracy"]["top1"]
            passed = drop <= conf.max_top1_drop
            out.append(
                {
                    "name": f"{name}.top1 vs baseline",
                    "model": name,
                    "metric": "top1_drop_vs_baseline",
                    "batch_size": None,
                    "threshold": conf.max_top1_drop,
                    "op": "<=",
                    "measured": drop,
                    "passed": passed,
                    "detail": f"top-1 {old['accuracy']['top1']:.4f} → {cur['accuracy']['top1']:.4f} "
                    f"(drop {drop:+.4f}, allowed {conf.max_top1_drop:g})",
                }
            )
        if conf.max_latency_regression_pct is None:
            continue
        for batch in sorted(set(cur.get("latency", {})) & set(old.get("latency", {}))):
            a, b = cur["latency"][batch].get("round_p50_ms"), old["latency"][batch].get("round_p50_ms")
            if not a or not b:
                raise UsageError(f"baseline gate: {name} {batch} has no measurement rounds (re-run the benchmark)")
            point, lo, hi = bootstrap_ratio(a, b, conf.confidence)
            limit = 1 + conf.max_latency_regression_pct / 100
            passed = lo <= limit  # fail only when confident the slowdown is past the limit
            bs = int(batch.split("_")[1])
            out.append(
                {
                    "name": f"{name}.p50_ms@{bs} vs baseline",
                    "model": name,
                    "metric": "latency_regression_pct",
                    "batch_size": bs,
                    "threshold": conf.max_latency_regression_pct,
                    "op": "<=",
                    "measured": 100 * (point - 1),
                    "passed": passed,
                    "detail": f"p50 ratio {point:.3f} ({100 * conf.confidence:g}% CI {lo:.3f}–{hi:.3f}) vs limit "
                    f"{limit:.3f}; {len(a)} vs {len(b)} rounds",
                }
            )
    return out


def run_gates(
    report: dict[str, Any],
    gates: list[GateConfig],
    expressions: list[str] | tuple[str, ...] = (),
    baseline: dict[str, Any] | None = None,
    baseline_conf: BaselineConfig | None = None,
) -> list[dict[str, Any]]:
    """All verdicts: configured gates, command-line ``--gate`` expressions, then the baseline comparison.

    Every gate is parsed and located before any is judged, so bad input never yields a partial verdict.
    """
    all_gates = [*gates, *(parse_gate(e) for e in expressions)]
    for g in all_gates:
        check_threads(report, g)
        measure(report, g)
    verdicts = evaluate(report, all_gates)
    if baseline is not None:
        verdicts += compare_baseline(report, baseline, baseline_conf or BaselineConfig())
    return verdicts


def format_table(verdicts: list[dict[str, Any]]) -> str:
    """gate | measured | threshold | verdict, as aligned text."""
    if not verdicts:
        return "no gates configured"
    rows = [("gate", "measured", "threshold", "verdict")]
    rows += [(v["name"], f"{v['measured']:.6g}", f"{v['op']} {v['threshold']:g}", "PASS" if v["passed"] else "FAIL")
             for v in verdicts]  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    failed = [v for v in verdicts if not v["passed"]]
    lines += [f"FAILED {v['name']}: {v['detail']}" for v in failed]
    lines.append(f"{len(verdicts) - len(failed)} passed, {len(failed)} failed")
    return "\n".join(lines)


def recommend(report: dict[str, Any], gates: list[GateConfig]) -> dict[str, Any] | None:
    """The fastest deployable model (student or one of its variants) that passes the student's gates.

    The student's accuracy, latency and size gates are the deployment requirements, so each variant is
    judged by them too (its parity is judged against the fp32 student, so the student's parity gates are
    not carried over); a gate whose figure a variant lacks is listed as not applicable.
    """
    models = report.get("models", {})
    candidates = [n for n in models if n == "student" or "variant" in models[n]]
    if not candidates:
        return None
    rows = []
    for name in candidates:
        applicable = [g.model_copy(update={"model": name}) for g in gates if g.model == "student"]
        applicable = [g for g in applicable if name == "student" or g.metric not in PARITY]
        applicable += [g for g in gates if g.model == name and name != "student"]
        failed, skipped = [], []
        for g in applicable:
            try:
                (verdict,) = evaluate(report, [g])
            except UsageError:
                skipped.append(gate_name(g))
                continue
            if not verdict["passed"]:
                failed.append(verdict["name"])
        # an edited or partial report may lack figures: such a model is simply not measured
        latency = {
            b: c["p90_ms"]
            for b, c in (models[name].get("latency") or {}).items()
            if re.fullmatch(r"batch_\d+", b) and isinstance(c, dict) and isinstance(c.get("p90_ms"), int | float)
        }
        batch = min(latency, key=lambda b: int(b.split("_")[1])) if latency else None
        rows.append(
            {
                "model": name,
                "passed": not failed,
                "failed": failed,
                "not_applicable": skipped,
                "batch": batch,
                "p90_ms": latency[batch] if batch else None,
            }
        )
    passing = [r for r in rows if r["passed"] and r["p90_ms"] is not None]
    best = min(passing, key=lambda r: r["p90_ms"]) if passing else None
    return {
        "recommended": best["model"] if best else None,
        "criterion": "lowest p90 latency at the smallest batch among the models that pass the student's gates",
        "candidates": rows,
    }
