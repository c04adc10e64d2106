"""Shared fixtures: tiny synthetic pipelines that run in seconds on one CPU thread."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("OMP_NUM_THREADS", "1")

TINY = {
    "data": {
        "dataset": "synthetic",
        "synthetic": {"num_classes": 4, "channels": 1, "image_size": 12, "train_size": 192, "test_size": 64},
    },
    "teacher": {"arch": "tiny_cnn_wide", "train": {"epochs": 2, "batch_size": 32, "lr": 0.05}},
    "distill": {"student": "tiny_cnn", "train": {"epochs": 2, "batch_size": 32, "lr": 0.05}},
    "export": {"parity": {"samples": 32}, "bundle_samples": 8},
    "benchmark": {"batch_sizes": [1, 4], "warmup": 1, "min_runs": 3, "min_seconds": 0.0, "max_seconds": 2.0},
    "runtime": {"threads": 1, "progress": False},
}


def deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@pytest.fixture
def write_config(tmp_path: Path):
    """Write a tiny pipeline config (optionally changed) and return its path."""

    def write(extra: dict | None = None, name: str = "pipeline.yaml", base: dict | None = None) -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(deep_merge(base or TINY, extra or {})))
        return path

    return write


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    try:
        import torch
    except ImportError:  # pragma: no cover
        yield
        return
    torch.set_num_threads(1)
    yield


def clean_env() -> dict[str, str]:
    """The environment minus anything that could make another interpreter see this project's packages."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}


@pytest.fixture(scope="session")
def bare_python(tmp_path_factory) -> str:
    """A fresh virtual environment holding only numpy and onnxruntime (no torch, no kdpipe): an edge device."""
    venv = tmp_path_factory.mktemp("bare") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=120)
    python = str(venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python"))
    try:
        pip = subprocess.run(
            [python, "-m", "pip", "install", "--quiet", "--retries", "1", "--timeout", "15", "numpy", "onnxruntime"],
            capture_output=True, text=True, timeout=180, env=clean_env(),
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.skip("pip could not install numpy and onnxruntime within 180 s (no network or package cache?)")
    if pip.returncode != 0:
        tail = (pip.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"pip could not install numpy and onnxruntime (no network or package cache?): {tail}")
    no_torch = subprocess.run([python, "-c", "import torch"], capture_output=True, env=clean_env())
    assert no_torch.returncode != 0, "torch must not be importable in the bare environment"
    return python
