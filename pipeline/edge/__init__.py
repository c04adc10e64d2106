"""Edge devices: the bundle, SSH targets, and the latency harness.

``runner.py`` is the single-file benchmark runner an edge bundle carries: it imports nothing of kdpipe (only the
standard library, numpy and onnxruntime), so it lives here with the code that ships and drives it, not with the
exporters, which never run it.
"""

from __future__ import annotations

from pathlib import Path

RUNNER = Path(__file__).resolve().with_name("runner.py")
