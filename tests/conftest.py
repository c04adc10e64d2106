"""Shared fixtures: tiny synthetic pipelines that run in seconds on one CPU thread."""

from __future__ import annotations

import os
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
