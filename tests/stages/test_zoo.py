"""Tests for the model zoo: every registered model builds, runs at 28 and 32 px, and traces with torch.fx."""

from __future__ import annotations

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from kdpipe.errors import UsageError
from kdpipe.ml.models.zoo import GrayToRGB, count_parameters, create_model, model_names
from kdpipe.registry import UnknownNameError

torch.set_num_threads(1)

EXPECTED_NAMES = {
    "resnet8",
    "resnet14",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
    "resnet8x4",
    "resnet32x4",
    "wrn_16_1",
    "wrn_16_2",
    "wrn_40_1",
    "wrn_40_2",
    "mobilenetv2",
    "mobilenetv2_w1",
    "shufflenetv2",
    "tiny_cnn",
    "tiny_cnn_wide",
}


def _is_global_pool(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(str(node.target)), nn.AdaptiveAvgPool2d)
    return node.op == "call_function" and node.target is F.adaptive_avg_pool2d


def test_all_expected_models_registered() -> None:
    assert EXPECTED_NAMES <= set(model_names())
    assert model_names() == sorted(model_names())


@pytest.mark.parametrize("name", model_names())
def test_forward_28_and_32_and_fx_trace(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, in_channels=1).eval()
    traced = torch.fx.symbolic_trace(model)
    pools = [n for n in traced.graph.nodes if _is_global_pool(traced, n)]
    assert pools, f"{name}: no global average pool found in the fx graph"
    with torch.no_grad():
        for size in (28, 32):
            x = torch.randn(2, 1, size, size)
            y = model(x)
            assert y.shape == (2, 10)
            # The traced graph must not have baked in one input size.
            torch.testing.assert_close(traced(x), y)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("resnet8", 78e3),
        ("resnet20", 0.27e6),
        ("resnet8x4", 1.2e6),
        ("resnet32x4", 7.4e6),
        ("wrn_16_2", 0.7e6),
        ("wrn_40_2", 2.2e6),
        ("mobilenetv2", 0.81e6),
        ("shufflenetv2", 1.35e6),
    ],
)
def test_parameter_counts_match_papers(name: str, expected: float) -> None:
    n = count_parameters(create_model(name, num_classes=100, in_channels=3))
    assert abs(n - expected) <= 0.1 * expected, f"{name}: {n} parameters, expected ~{expected:.0f}"


def test_tiny_models_are_tiny() -> None:
    student = count_parameters(create_model("tiny_cnn", num_classes=10, in_channels=1))
    teacher = count_parameters(create_model("tiny_cnn_wide", num_classes=10, in_channels=1))
    assert student < 5_000
    assert teacher > student


def test_in_channels_reaches_first_conv() -> None:
    model = create_model("resnet8", num_classes=10, in_channels=3)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    with pytest.raises(RuntimeError):
        model(torch.randn(1, 1, 32, 32))


def test_unknown_name_lists_known() -> None:
    with pytest.raises(UnknownNameError, match="known:") as info:
        create_model("resnet9000", num_classes=10, in_channels=1)
    assert "resnet8" in str(info.value)


def test_torchvision_gray_input_is_wrapped() -> None:
    model = create_model("torchvision:resnet18", num_classes=10, in_channels=1).eval()
    assert isinstance(model, GrayToRGB)
    with torch.no_grad():
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)


def test_torchvision_rgb_is_not_wrapped() -> None:
    model = create_model("torchvision:mobilenet_v3_small", num_classes=7, in_channels=3)
    assert not isinstance(model, GrayToRGB)
    assert model.classifier[-1].out_features == 7


def test_torchvision_unknown_name() -> None:
    with pytest.raises(UnknownNameError, match="known:") as info:
        create_model("torchvision:resnet19", num_classes=10, in_channels=3)
    assert "torchvision:resnet18" in str(info.value)


def test_torchvision_rejects_other_channel_counts() -> None:
    with pytest.raises(UsageError, match="1 or 3"):
        create_model("torchvision:resnet18", num_classes=10, in_channels=2)
