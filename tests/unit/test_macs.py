"""MACs counted from the ONNX graph match torch's own flop counter, and quantisation keeps the count."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from kdpipe.reporting.macs import count_macs, format_macs


class Net(nn.Module):
    """Plain, strided and grouped (depthwise) convolutions, then a linear head: every counted op kind."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1, groups=16),
            nn.ReLU(),
            nn.Conv2d(16, 12, 1, groups=4),
        )
        self.head = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean((2, 3)))


def _export(tmp_path: Path) -> tuple[Path, int]:
    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(1, 1, 12, 12)
    with FlopCounterMode(display=False) as counter:
        model(x)
    path = tmp_path / "net.onnx"
    torch.onnx.export(model, x, str(path), dynamo=False, input_names=["input"], dynamic_axes={"input": {0: "batch"}})
    return path, counter.get_total_flops() // 2


def test_onnx_count_matches_torch_flop_counter(tmp_path: Path):
    path, expected = _export(tmp_path)
    result = count_macs(path)
    assert result["macs"] == expected > 0
    assert result["flops"] == 2 * expected
    assert result["uncounted"] == []
    assert set(result["per_op"]) == {"Conv", "Gemm"}
    assert result["per_op"]["Gemm"] == 12 * 5


def test_quantised_graph_has_the_same_count(tmp_path: Path):
    quantization = pytest.importorskip("onnxruntime.quantization")
    path, expected = _export(tmp_path)
    quantised = tmp_path / "net-int8.onnx"
    quantization.quantize_dynamic(str(path), str(quantised))
    result = count_macs(quantised)
    assert result["macs"] == expected
    assert "ConvInteger" in result["per_op"] or "MatMulInteger" in result["per_op"]


def test_format_macs():
    assert format_macs(9_345_920) == "9.35M"
    assert format_macs(1_350_000_000) == "1.35G"
    assert format_macs(512) == "512"
    assert format_macs(None) == "–"
