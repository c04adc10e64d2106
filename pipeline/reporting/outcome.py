"""After a run (or on ``kdpipe gate``): judge the gates, recommend a deployment, publish the reports.

The runner and the ``gate`` command share these, so a verdict is computed one way only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kdpipe.config import LoadedConfig
from kdpipe.errors import GateFailure
from kdpipe.reporting.gates import format_table, parse_gate, recommend, run_gates
from kdpipe.reporting.report import build_report, publish


def judge(
    report: dict[str, Any],
    cfg: LoadedConfig,
    expressions: list[str] | tuple[str, ...] = (),
    baseline: dict[str, Any] | None = None,
    complete: bool = True,
) -> None:
    """Fill ``report["gates"]`` (configured gates, ``--gate`` expressions, baseline) and ``report["deployment"]``.

    A run stopped early (``--until``) has no verdicts and no recommendation: its figures are incomplete.
    """
    if not complete:
        return
    if cfg.config.gates or expressions or baseline:
        report["gates"] = run_gates(report, list(cfg.config.gates), expressions, baseline, cfg.config.baseline)
    report["deployment"] = recommend(report, [*cfg.config.gates, *(parse_gate(g) for g in expressions)])


def raise_on_failure(report: dict[str, Any]) -> None:
    """Exit 1 (:class:`GateFailure`) naming every failed gate."""
    failed = [g["name"] for g in report.get("gates") or [] if not g["passed"]]
    if failed:
        raise GateFailure(f"{len(failed)} gate{'s' if len(failed) > 1 else ''} failed: {', '.join(failed)}")


def conclude(
    cfg: LoadedConfig,
    record: dict[str, Any],
    stopped_after: str | None,
    expressions: list[str],
    baseline: dict[str, Any] | None,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Build the report of a finished run, judge it, publish it, print the verdicts; exit 1 on a failed gate.

    ``stopped_after`` names the last stage of a run stopped early (``--until``), else None.
    """
    report = build_report(cfg, record)
    if stopped_after and (cfg.config.gates or expressions or baseline):
        echo(f"gates not evaluated: the run stopped after '{stopped_after}'")
    judge(report, cfg, expressions, baseline, complete=stopped_after is None)
    publish(cfg, report, record)
    if report["gates"]:
        echo(format_table(report["gates"]))
    raise_on_failure(report)
    return report
