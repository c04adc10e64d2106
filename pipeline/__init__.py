"""kdpipe: distil a big image classifier into a small, verified, benchmarked ONNX student.

Python API (heavy modules load on first use)::

    from pipeline import run
    report = run("pipeline.yaml")          # same as `kdpipe run -c pipeline.yaml`
    print(report["models"]["student"]["accuracy"]["top1"])
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def run(config: str | None = "pipeline.yaml", **kwargs: Any) -> dict[str, Any]:
    """Run the pipeline of ``config`` and return its report (see :func:`pipeline.runner.run_pipeline`)."""
    from pipeline.runner import run_pipeline

    return run_pipeline(config, **kwargs)
