"""timm models build offline and split through timm's own contract: maps for CNNs, pre-logits for ViTs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdpipe.errors import UsageError
from kdpipe.ml.models.split import split_model
from kdpipe.ml.models.zoo import count_parameters, create_model
from kdpipe.registry import UnknownNameError

X = torch.randn(3, 1, 32, 32)
ARCHS = {
    "timm:resnet10t": ("map", {}),
    "timm:mobilenetv3_small_050": ("map", {}),
    "timm:test_efficientnet": ("map", {}),
    "timm:test_convnext": ("map", {}),
    "timm:regnetx_002": ("map", {}),
    "timm:test_vit": ("pre_logits", {"patch_size": 8}),
}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_body_then_head_is_the_model_and_each_part_is_trimmed(arch):
    mode, kwargs = ARCHS[arch]
    torch.manual_seed(0)
    model = create_model(arch, num_classes=5, in_channels=1, image_size=32, kwargs=kwargs).eval()
    s = split_model(model, X[:2])
    assert s.mode == mode
    with torch.no_grad():
        features = s.body(X)
        torch.testing.assert_close(s.head(features), model(X))
    assert tuple(features.shape[1:]) == s.feature_shape
    if mode == "pre_logits":  # the pooled, normed class token: D values as a 1×1 map; the head is the classifier
        assert s.feature_shape == (model.num_features, 1, 1)
        assert count_parameters(s.head) == count_parameters(model.get_classifier())
    # neither part carries the other's modules: together they hold the model's parameters once
    assert count_parameters(s.body) + count_parameters(s.head) == count_parameters(model)


def test_a_feature_node_forces_the_fx_cut_and_zoo_models_still_trace():
    s = split_model(create_model("tiny_cnn", num_classes=4, in_channels=1), torch.zeros(2, 1, 12, 12))
    assert s.mode == "fx" and s.feature_shape == (16, 6, 6)


def test_timm_names_are_checked_and_never_download():
    with pytest.raises(UnknownNameError, match=r"unknown timm model 'resnet10'; did you mean timm:resnet10t"):
        create_model("timm:resnet10", num_classes=4, in_channels=1)
    with pytest.raises(UsageError, match=r"'pretrained' is not accepted; kdpipe never downloads weights"):
        create_model("timm:resnet10t", num_classes=4, in_channels=1, kwargs={"pretrained": True})
    with pytest.raises(UsageError, match=r"timm:resnet10t cannot be built with \{'bogus': 1\}"):
        create_model("timm:resnet10t", num_classes=4, in_channels=1, kwargs={"bogus": 1})
    with pytest.raises(UsageError, match=r"zoo model 'resnet8' takes no extra arguments"):
        create_model("resnet8", num_classes=4, in_channels=1, kwargs={"width": 2})


def test_a_vit_is_built_for_the_data_image_size_and_channels():
    model = create_model("timm:test_vit", num_classes=3, in_channels=2, image_size=24, kwargs={"patch_size": 6})
    assert model(torch.zeros(1, 2, 24, 24)).shape == (1, 3)
    assert model.patch_embed.grid_size == (4, 4)


class Contract(nn.Module):
    """A user model following timm's contract whose head does not undo the body: refused with the way out."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward_features(self, x):
        return self.conv(x)

    def forward_head(self, x, pre_logits: bool = False):
        x = x.mean((2, 3))
        return x if pre_logits else self.fc(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x)) * 2


def test_a_contract_that_does_not_rejoin_is_refused():
    with pytest.raises(UsageError, match=r"forward_head\(forward_features\(x\)\) is not forward\(x\)"):
        split_model(Contract(), torch.zeros(2, 1, 8, 8), what="teacher.arch")


@pytest.mark.parametrize(("teacher", "relu"), [("tiny_cnn_wide", True), ("timm:test_vit", False)])
def test_simkd_projector_ends_in_relu_only_for_a_teacher_whose_features_do(teacher, relu):
    from kdpipe.config import DistillConfig
    from kdpipe.stages.distillers import DISTILLERS, DataInfo, TeacherParts

    info = DataInfo(4, (1, 32, 32), ["a", "b", "c", "d"])
    kwargs = {"patch_size": 8} if "vit" in teacher else {}
    t = split_model(info.create(teacher, kwargs), info.example())
    simkd = DISTILLERS.get("simkd")
    built = simkd().build(TeacherParts(teacher, t, kwargs), "timm:test_byobnet", info, DistillConfig())
    assert built.spec["projector_final_relu"] is relu
    assert isinstance(built.model.projector[-1], nn.ReLU) is relu
    assert built.spec["projector_kernel"] == 1  # test_byobnet's map is 1×1 at 32 px: maps are aligned at 1×1
    rebuilt = simkd.rebuild(built.spec)
    rebuilt.load_state_dict(built.model.state_dict())
    x = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(rebuilt.eval()(x), built.model.eval()(x))
