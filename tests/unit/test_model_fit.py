"""Whether a model takes the data: the real cause of a failing forward pass, in one line, with only the settings
the dataset has (and that accept the value) suggested."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdpipe.config import DataConfig, PipelineConfig
from kdpipe.ml.models.model_fit import SETTINGS, DataFit, checkpoint_problem, fit_problem

SYNTHETIC = DataConfig(dataset="synthetic")
FIT = DataFit(channels=1, height=12, width=12, classes=4, data=SYNTHETIC)


def net(*layers: nn.Module) -> nn.Module:
    return nn.Sequential(*layers)


def head(width: int, classes: int = 4) -> list[nn.Module]:
    return [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, classes)]


def test_a_model_that_fits_passes_and_keeps_its_mode():
    model = net(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), *head(8)).train()
    assert fit_problem(model, "m", FIT) is None
    assert model.training


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        (
            net(nn.Conv2d(3, 8, 3), *head(8)),
            "m expects 3 input channels; the data has 1 (set data.synthetic.channels: 3)",
        ),
        (
            net(nn.Conv2d(1, 8, 3), nn.Conv2d(16, 8, 3), *head(8)),
            "m fails on 1×12×12 images: layer '1' (Conv2d) expects 16 channels but the layer before it gives 8",
        ),
        (
            net(nn.Conv2d(1, 8, 3), nn.Flatten(), nn.Linear(8 * 26 * 26, 4)),
            "m fails on 1×12×12 images: layer '2' (Linear) expects 5408 input features, gets 800; was it built for "
            "another image size? (set data.synthetic.image_size to the size it was built for or pool globally)",
        ),
        (
            net(nn.Conv2d(1, 8, 5, stride=4), nn.Conv2d(8, 8, 5), *head(8)),
            "m fails on 1×12×12 images: layer '1' (Conv2d) gets a 2×2 map, smaller than its window",
        ),
        (net(nn.Conv2d(1, 4, 3)), "m gives outputs of shape (2, 4, 10, 10) for 2 1×12×12 images, not (2, 4)"),
        (
            net(nn.Conv2d(1, 8, 3), *head(8, classes=10)),
            "m gives 10 logits per image; the data has 4 classes (set data.synthetic.num_classes: 10)",
        ),
    ],
    ids=["stem", "inner-conv", "flatten-size", "too-small", "no-pool", "classes"],
)
def test_the_cause_is_named(model, expected):
    problem = fit_problem(model, "m", FIT)
    assert problem is not None and problem.startswith(expected), problem
    assert "\n" not in problem


class TwoOutputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = net(nn.Conv2d(1, 4, 3), *head(4))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.body(x), x


class Broken(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise KeyError("no such branch")


def test_what_forward_returns_and_raises():
    assert fit_problem(TwoOutputs(), "m", FIT).startswith("m returns a tuple of 2 from forward, not a tensor of logits")
    assert fit_problem(Broken(), "m", FIT) == (
        "m fails on a zero batch of 1×12×12 images in Broken.forward: KeyError: 'no such branch'"
    )


def test_a_torchscript_model_is_diagnosed_from_the_error_text():
    scripted = torch.jit.script(net(nn.Conv2d(3, 8, 3), *head(8)).eval())
    assert fit_problem(scripted, "t.ts", FIT).startswith("t.ts expects 3 input channels; the data has 1")


def test_the_python_builder_is_told_what_to_take(tmp_path):
    from kdpipe.ml.models.model_fit import builder_hints

    (tmp_path / "m.py").write_text("def bare():\n    pass\n\ndef takes(in_channels, **kw):\n    pass\n")
    bare, takes = (builder_hints(f"python:{tmp_path / 'm.py'}:{f}") for f in ("bare", "takes"))
    assert bare["channels"] == "take in_channels and build the stem from it"
    assert takes["channels"] == "build the stem from in_channels" and takes["classes"].startswith("build ")
    assert builder_hints("timm:resnet10t") == {}


@pytest.mark.parametrize(
    ("data", "needs", "expected"),
    [
        (SYNTHETIC, 3, "set data.synthetic.channels: 3"),
        (SYNTHETIC, 5, None),  # data.synthetic.channels is at most 4
        (DataConfig(dataset="imagefolder", root="x"), 3, "set data.channels: 3"),
        (DataConfig(dataset="imagefolder", root="x"), 4, None),  # data.channels is 1 or 3
        (DataConfig(dataset="fashion_mnist"), 3, None),  # the built-in datasets fix their channels
        (DataConfig(dataset="cifar10"), 1, None),
    ],
)
def test_only_settings_that_exist_and_accept_the_value_are_suggested(data, needs, expected):
    assert DataFit(1, 12, 12, 4, data).setting("channels", needs) == expected


@pytest.mark.parametrize("key", sorted({k for kind in SETTINGS.values() for k in kind.values()}))
def test_every_suggested_key_is_in_the_config(key):
    model = PipelineConfig
    for part in key.split("."):
        assert part in model.model_fields, f"{key}: no '{part}'"
        model = model.model_fields[part].annotation
        model = next((a for a in getattr(model, "__args__", ()) if hasattr(a, "model_fields")), model)


def test_a_checkpoint_made_for_other_data_says_which_side():
    ours = net(nn.Conv2d(1, 8, 3), *head(8))
    rgb = net(nn.Conv2d(3, 8, 3), *head(8)).state_dict()
    thousand = net(nn.Conv2d(1, 8, 3), *head(8, classes=1000)).state_dict()
    assert checkpoint_problem(ours, rgb, "t.pt", FIT) == (
        "t.pt was trained on 3-channel images ('0.weight' is [8, 3, 3, 3]); the data has 1 "
        "(set data.synthetic.channels: 3)"
    )
    fm = DataFit(1, 28, 28, 4, DataConfig(dataset="fashion_mnist"))
    assert checkpoint_problem(ours, thousand, "t.pt", fm) == (
        "t.pt holds a classifier for 1000 classes ('3.weight' is [1000, 8]); the data has 4 classes"
    )
    other = net(nn.Conv2d(1, 16, 3), *head(16)).state_dict()  # another architecture: not the data's fault
    assert checkpoint_problem(ours, other, "t.pt", FIT) is None
