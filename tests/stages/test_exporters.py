"""Tests for kdpipe.exporters.onnx_export and kdpipe.exporters.parity on a tiny conv net."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from kdpipe.errors import StageError, UsageError
from kdpipe.exporters.onnx_export import export_onnx, onnx_parameter_count
from kdpipe.exporters.parity import assert_parity, check_parity

INPUT_SHAPE = (1, 8, 8)
METADATA = {"kdpipe.model": "tiny", "kdpipe.num_classes": "3"}


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()


@pytest.fixture(scope="module", params=["dynamo", "torchscript"])
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    torch.set_num_threads(1)
    exporter = request.param
    out_dir = tmp_path_factory.mktemp(f"onnx_{exporter}")
    model = tiny_net()
    path = out_dir / "tiny.onnx"
    info = export_onnx(model, path, torch.randn(2, *INPUT_SHAPE), opset=18, exporter=exporter, metadata=METADATA)
    return model, path, info, exporter


def test_export_writes_one_valid_file(exported: tuple) -> None:
    model, path, info, exporter = exported
    assert path.exists()
    assert sorted(p.name for p in path.parent.iterdir()) == ["tiny.onnx"], "no external-data sidecar expected"
    onnx.checker.check_model(str(path), full_check=True)
    n_params = sum(p.numel() for p in model.parameters())
    assert info == {
        "file": "tiny.onnx",
        "bytes": path.stat().st_size,
        "opset": 18,
        "exporter": exporter,
        "parameters": onnx_parameter_count(path),
    }
    assert info["parameters"] == n_params


def test_export_metadata_round_trips(exported: tuple) -> None:
    _, path, _, _ = exported
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert props == METADATA


@pytest.mark.parametrize("batch", [1, 5])
def test_export_has_dynamic_batch(exported: tuple, batch: int) -> None:
    model, path, _, _ = exported
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input"]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    x = np.random.default_rng(batch).standard_normal((batch, *INPUT_SHAPE), dtype=np.float32)
    (logits,) = session.run(None, {"input": x})
    assert logits.shape == (batch, 3)
    with torch.no_grad():
        np.testing.assert_allclose(logits, model(torch.from_numpy(x)).numpy(), atol=1e-5)


def test_export_with_batch_one_example(tmp_path: Path) -> None:
    path = tmp_path / "b1.onnx"
    export_onnx(tiny_net(), path, torch.randn(1, *INPUT_SHAPE))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"input": np.zeros((4, *INPUT_SHAPE), dtype=np.float32)})
    assert logits.shape == (4, 3)


def test_export_rejects_unknown_exporter(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="exporter"):
        export_onnx(tiny_net(), tmp_path / "x.onnx", torch.randn(2, *INPUT_SHAPE), exporter="bogus")


def test_parity_matches(exported: tuple) -> None:
    model, path, _, _ = exported
    images = torch.randn(20, *INPUT_SHAPE, generator=torch.Generator().manual_seed(1))
    result = check_parity(model, path, images, batch_size=8)
    assert result["samples"] == 20
    assert result["max_abs_diff"] < 1e-4
    assert 0.0 <= result["mean_abs_diff"] <= result["max_abs_diff"]
    assert result["top1_agreement"] == 1.0
    assert_parity(result, max_abs_diff=1e-4, min_top1_agreement=1.0, what="tiny.onnx")


def test_parity_failure_raises_stage_error(tmp_path: Path) -> None:
    model = tiny_net()
    path = tmp_path / "tiny.onnx"
    export_onnx(model, path, torch.randn(2, *INPUT_SHAPE), exporter="torchscript")
    with torch.no_grad():
        model[4].bias[0] += 0.5  # the file keeps the old weights
    images = torch.randn(20, *INPUT_SHAPE, generator=torch.Generator().manual_seed(2))
    result = check_parity(model, path, images)
    assert result["max_abs_diff"] == pytest.approx(0.5, abs=1e-4)
    with pytest.raises(StageError) as info:
        assert_parity(result, max_abs_diff=1e-4, min_top1_agreement=0.999, what="student.onnx")
    message = str(info.value)
    assert info.value.stage == "export"
    assert "student.onnx parity" in message
    assert f"{result['max_abs_diff']:.1e}" in message
    assert "tolerance 1.0e-04" in message
    assert "0.999" in message


def test_parity_agreement_failure_names_both_figures() -> None:
    result = {"samples": 1000, "max_abs_diff": 1e-6, "mean_abs_diff": 1e-7, "top1_agreement": 0.95}
    with pytest.raises(StageError, match=r"top-1 agreement 0\.9500 < 0\.999"):
        assert_parity(result, max_abs_diff=1e-4, min_top1_agreement=0.999, what="student.onnx")


def test_benchmark_rejects_unavailable_provider() -> None:
    from kdpipe.stages.benchmark import providers_to_measure

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDAExecutionProvider is available here")
    with pytest.raises(UsageError, match="CUDAExecutionProvider' is not available here"):
        providers_to_measure(["CUDAExecutionProvider"])
    assert providers_to_measure(["available"]) == ort.get_available_providers()
