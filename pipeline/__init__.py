"""kdpipe: distil a big image classifier into a small, verified, benchmarked ONNX student.

Python API (heavy modules load on first use)::

    from kdpipe import run
    report = run("pipeline.yaml")          # same as `kdpipe run -c pipeline.yaml`
    print(report["models"]["student"]["accuracy"]["top1"])
"""

from __future__ import annotations

from typing import Any

from kdpipe.version import __version__

__all__ = ["__version__", "run"]


def run(config: str | None = "pipeline.yaml", **kwargs: Any) -> dict[str, Any]:
    """Run the pipeline of ``config`` and return its report (see :func:`kdpipe.runner.run_pipeline`)."""
    from kdpipe.runner import run_pipeline

    return run_pipeline(config, **kwargs)
