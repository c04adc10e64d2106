"""Fake quantisation for QAD: matches ORT's int8 kernels, exports to a QDQ graph ORT runs in int8, round-trips."""

from __future__ import annotations

import platform
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from kdpipe.exporters.onnx_export import export_onnx
from kdpipe.exporters.precision import computed_precision
from kdpipe.exporters.qad import (
    ActQuant,
    QuantConv,
    QuantLinear,
    attach,
    calibrate,
    detach,
    fold,
    quantize_weight,
    settle_dead_channels,
)
from kdpipe.exporters.variants import compare, evaluate_onnx, make_fp16, make_int8_static


def tiny() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8), nn.ReLU6(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )  # fmt: skip
    model.train()
    with torch.no_grad():  # non-trivial BN statistics, so folding matters
        for _ in range(3):
            model(torch.randn(32, 1, 8, 8) * 2 + 0.5)
    return model.eval()


def tiny_timm() -> nn.Module:
    """``tiny`` built with timm's BatchNormAct2d (BN and its activation in one module), as timm models are."""
    from timm.layers import BatchNormAct2d

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), BatchNormAct2d(8, act_layer=nn.ReLU), nn.Conv2d(8, 8, 3, padding=1, bias=False),
        BatchNormAct2d(8, act_layer=nn.ReLU6), nn.Conv2d(8, 8, 1, bias=False), BatchNormAct2d(8, apply_act=False),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )  # fmt: skip
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(32, 1, 8, 8) * 2 + 0.5)
    return model.eval()


def test_weight_quantisation_is_per_channel_symmetric_127() -> None:
    w = torch.tensor([[1.0, -0.5, 0.26], [0.01, 0.02, -0.04]])
    q = quantize_weight(w)
    assert torch.allclose(q[0], torch.round(w[0] * 127) / 127)  # channel 0: scale 1/127
    assert q[1].abs().max() == pytest.approx(0.04)  # channel 1 keeps its own scale
    assert torch.allclose(quantize_weight(w, per_channel=False)[1], torch.round(w[1] * 127) / 127)  # one scale


def test_activation_range_includes_zero_and_clamps() -> None:
    q = ActQuant(0.0, 6.0)
    q.min.fill_(-3.0)
    q.max.fill_(10.0)
    scale, zero = q.scale_zero_point()
    assert scale == pytest.approx(6.0 / 255) and zero == 0  # a following ReLU6 clamps the range to [0, 6]
    q = ActQuant()
    q.min.fill_(0.5)
    q.max.fill_(2.55)
    assert q.scale_zero_point() == (pytest.approx(2.55 / 255), 0)  # widened to include 0


def test_attach_folds_bn_and_detach_restores(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    model = tiny()
    keys = set(model.state_dict())
    x = torch.randn(64, 1, 8, 8) * 2 + 0.5
    with torch.no_grad():
        fp32 = model(x)
    names = attach(model)
    assert names == ["0", "3", "8"]
    assert isinstance(model[0], QuantConv) and isinstance(model[8], QuantLinear) and isinstance(model[1], nn.Identity)
    assert model[3].output_quant.high == 6.0 and model[8].output_quant.low is None
    with pytest.raises(RuntimeError, match="calibrate"):
        model(x)
    calibrate(model, x)
    with torch.no_grad():
        fake = model(x)
    assert 0 < (fake - fp32).abs().max() < 0.1  # quantisation noise, not a different network
    model(x).sum().backward()  # straight-through gradients reach the conv weights and the BN affine parameters
    assert model[0].conv.weight.grad is not None and model[0].bn.weight.grad is not None
    detach(model, names)
    assert set(model.state_dict()) == keys
    with torch.no_grad():
        assert torch.equal(model(x), fp32)


def test_attach_folds_timm_batchnormact() -> None:
    """timm's BatchNormAct2d is folded like a BatchNorm2d; its activation stays in the model and clamps the range."""
    torch.set_num_threads(1)
    model = tiny_timm()
    originals = [type(m) for m in model]
    x = torch.randn(64, 1, 8, 8) * 2 + 0.5
    with torch.no_grad():
        fp32 = model(x)
    names = attach(model)
    assert names == ["0", "2", "4", "8"]
    assert isinstance(model[1], nn.ReLU) and isinstance(model[3], nn.ReLU6) and isinstance(model[5], nn.Identity)
    assert model[0].bn is not None and model[4].bn is not None  # folded, not left behind in the model
    assert model[0].output_quant.high == 6.0e30 and model[2].output_quant.high == 6.0
    assert model[4].output_quant.low is None  # no activation after the projection: signed range
    calibrate(model, x)
    with torch.no_grad():
        assert 0 < (model(x) - fp32).abs().max() < 0.1
    detach(model, names)
    assert [type(m) for m in model] == originals
    with torch.no_grad():
        assert torch.equal(model(x), fp32)


# the timm model requantises once more (a 1x1 conv with no activation before the pool): more of ORT's integer
# rounding that fake quantisation does not reproduce
def test_dead_channel_is_settled_without_changing_the_function() -> None:
    """A depthwise channel fed only zeros: folding its BN blows its weights up ~300x and per-tensor int8 of the
    layer collapses; settling zeroes it, the fp32 output stays, the layer's weight range shrinks to its live
    channels."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(4), nn.ReLU6(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    )  # fmt: skip
    with torch.no_grad():
        model[1].bias[1] = -50.0  # the ReLU after it never fires on channel 1: the depthwise channel 1 sees zeros
        model.train()
        for _ in range(300):  # running statistics as training leaves them: variance of channel 1 decays to ~0
            model(torch.randn(16, 1, 6, 6))
    model.eval()
    x = torch.randn(32, 1, 6, 6)
    with torch.no_grad():
        fp32 = model(x)
        before, _ = fold(model[3].weight, None, model[4])
    assert before[1].abs().max() > 50 * before[[0, 2, 3]].abs().max()  # the dead channel dominates the layer
    names = attach(model, per_channel=False)
    assert settle_dead_channels(model) == {"3": 1}
    assert settle_dead_channels(model) == {"3": 1}  # idempotent: the channel stays dead, its weights stay 0
    with torch.no_grad():
        after, _ = fold(model[3].conv.weight, None, model[3].bn)
    assert after[1].abs().max() == 0 and torch.equal(after[[0, 2, 3]], before[[0, 2, 3]])
    detach(model, names)
    with torch.no_grad():
        assert torch.allclose(model(x), fp32, atol=1e-5)


@pytest.mark.parametrize(("build", "closer"), [(tiny, 0.75), (tiny_timm, 0.85)])
@pytest.mark.parametrize("per_channel", [True, False])
def test_fake_quant_matches_ort_int8_kernels(tmp_path: Path, per_channel: bool, build, closer: float) -> None:
    torch.set_num_threads(1)
    model = build()
    cal, x = torch.randn(64, 1, 8, 8) * 2 + 0.5, torch.randn(256, 1, 8, 8) * 2 + 0.5
    export_onnx(model, tmp_path / "fp32.onnx", x[:2], 18, "dynamo")
    make_int8_static(tmp_path / "fp32.onnx", tmp_path / "int8.onnx", cal.numpy(), per_channel=per_channel)
    names = attach(model, per_channel)
    calibrate(model, cal)
    with torch.no_grad():
        fake = model(x).numpy()
    detach(model, names)
    ort_int8 = evaluate_onnx(tmp_path / "int8.onnx", x.numpy())
    fp32 = evaluate_onnx(tmp_path / "fp32.onnx", x.numpy())
    to_fake, to_fp32 = compare(ort_int8, fake), compare(ort_int8, fp32)
    # the fake-quant model predicts ORT's int8 output much better than the fp32 model does
    assert to_fake["mean_abs_diff"] < closer * to_fp32["mean_abs_diff"]  # the rest: ORT's integer requantisation
    assert to_fake["top1_agreement"] >= 0.99
    precision = computed_precision(tmp_path / "int8.onnx")
    assert precision["computes_in"] == "int8" and precision["nodes"]["int8"] >= 3  # QLinearConv ×2, QGemm


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="ORT has fp16 CPU kernels on ARM64")
def test_fp16_on_cpu_is_reported_as_fp32(tmp_path: Path) -> None:
    model = tiny()
    export_onnx(model, tmp_path / "fp32.onnx", torch.zeros(2, 1, 8, 8), 18, "dynamo")
    make_fp16(tmp_path / "fp32.onnx", tmp_path / "fp16.onnx")
    x = np.random.default_rng(0).standard_normal((8, 1, 8, 8)).astype(np.float32)
    assert np.abs(evaluate_onnx(tmp_path / "fp16.onnx", x) - evaluate_onnx(tmp_path / "fp32.onnx", x)).max() < 1e-2
    assert computed_precision(tmp_path / "fp16.onnx")["computes_in"] == "fp32"
    assert computed_precision(tmp_path / "fp32.onnx")["computes_in"] == "fp32"
