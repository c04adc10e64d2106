"""Tune ONNX Runtime session settings for one model: intra-op threads × graph optimisation level × execution mode
(× provider), measured by the edge runner's noise-aware harness and written as ``MODEL.session.json``.

Every candidate is timed in its own child process (as the benchmark does) in ``rounds`` rounds; the fastest by median
round p50 replaces the benchmark's default session (ORT_ENABLE_ALL, sequential, the first thread count) only when the
bootstrap interval of its p50 ratio to the default lies wholly below 1: a win that the noise could explain keeps the
default. The edge runner applies the file it finds beside a model (see ``kdpipe/edge/runner.py``).
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path
from typing import Any

from kdpipe.edge.runner import run_isolated, session_path
from kdpipe.reporting.gates import bootstrap_ratio

LEVELS = ("ORT_ENABLE_BASIC", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL")
MODES = ("ORT_SEQUENTIAL", "ORT_PARALLEL")
DEFAULT = {"graph_optimization_level": "ORT_ENABLE_ALL", "execution_mode": "ORT_SEQUENTIAL"}


def candidates(threads: list[int]) -> list[dict[str, Any]]:
    """Every session setting to try; parallel execution gets as many inter-op threads as intra-op ones."""
    out = []
    for t in threads:
        for level in LEVELS:
            for mode in MODES:
                inter = t if mode == "ORT_PARALLEL" else 1
                out.append({"intra_op_num_threads": t, "inter_op_num_threads": inter,
                            "graph_optimization_level": level, "execution_mode": mode})  # fmt: skip
    return out


def thread_options(cpu_count: int | None = None) -> list[int]:
    """1, 2, 4, … up to the host's cores (and the core count itself)."""
    cores = cpu_count or os.cpu_count() or 1
    options, t = [], 1
    while t < cores:
        options.append(t)
        t *= 2
    return [*options, cores]


def tune_session(
    path: Path,
    input_shape: list[int],
    threads: list[int] | None = None,
    providers: list[str] | None = None,
    batch_size: int = 1,
    timing: dict[str, Any] | None = None,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """Measure every candidate session for ``path`` at ``batch_size`` and pick the best, noise-aware.

    Args:
        timing: the runner's timing keys (``warmup``, ``min_runs``, ``min_seconds``, ``max_seconds``, ``rounds``).

    Returns:
        ``{"session": chosen settings + "provider", "default", "tuned": bool, "p50_ratio": [point, lo, hi],
        "candidates": [{settings, "provider", "p50_ms", "p90_ms"}], "batch_size"}``.
    """
    threads = threads or thread_options()
    providers = providers or ["CPUExecutionProvider"]
    timing = {"warmup": 10, "min_runs": 50, "min_seconds": 0.5, "max_seconds": 10.0, "rounds": 10, "seed": 0,
              **(timing or {})}  # fmt: skip
    default = {"intra_op_num_threads": threads[0], "inter_op_num_threads": 1, **DEFAULT}
    rows: list[dict[str, Any]] = []
    for provider in providers:
        for settings in candidates(threads):
            cell = dict(timing, path=str(path), input_shape=list(input_shape), batch_sizes=[batch_size],
                        provider=provider, threads=settings["intra_op_num_threads"], model=Path(path).stem,
                        file=Path(path).name, session=settings)  # fmt: skip
            (result,) = run_isolated(cell)
            rows.append({**settings, "provider": provider, "p50_ms": result["p50_ms"], "p90_ms": result["p90_ms"],
                         "round_p50_ms": result["round_p50_ms"]})  # fmt: skip
    base = next(r for r in rows if r["provider"] == providers[0] and all(r[k] == v for k, v in default.items()))
    best = min(rows, key=lambda r: statistics.median(r["round_p50_ms"]))
    point, lo, hi = bootstrap_ratio(best["round_p50_ms"], base["round_p50_ms"], confidence)
    chosen = best if hi < 1.0 else base
    keys = (*default, "provider")
    return {
        "session": {k: chosen[k] for k in keys},
        "default": {k: base[k] for k in keys},
        "tuned": chosen is not base,
        "p50_ratio": [point, lo, hi],
        "confidence": confidence,
        "batch_size": batch_size,
        "candidates": [{k: v for k, v in r.items() if k != "round_p50_ms"} for r in rows],
    }


def write_session(model: Path, tuned: dict[str, Any]) -> Path:
    """``MODEL.session.json`` beside ``model``: the chosen settings plus how they were chosen."""
    path = Path(session_path(str(model)))
    chosen = next(c for c in tuned["candidates"] if all(c[k] == v for k, v in tuned["session"].items()))
    doc = {
        **tuned["session"],
        "schema": "kdpipe.session/1",
        "batch_size": tuned["batch_size"],
        "p50_ms": chosen["p50_ms"],
        "p50_ratio_vs_default": tuned["p50_ratio"],
        "default": tuned["default"],
    }
    path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return path
