import pytest
import torch
from torch import nn

from kdpipe.errors import UsageError
from kdpipe.ml.models.split import split_model
from kdpipe.ml.models.zoo import create_model, model_names

X = torch.randn(2, 1, 28, 28)


@pytest.mark.parametrize("name", [n for n in model_names() if n not in ("resnet110", "resnet32x4")])
def test_body_then_head_is_the_model(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, in_channels=1).eval()
    split = split_model(model, X)
    feats = split.body(X)
    assert tuple(feats.shape[1:]) == split.feature_shape and feats.ndim == 4
    torch.testing.assert_close(split.head(feats), model(X))
    assert not any(isinstance(m, nn.Linear) for m in split.body.modules())  # the classifier is in the head


@pytest.mark.parametrize(("name", "channels"), [("mobilenetv2", 1280), ("shufflenetv2", 1024)])
def test_models_whose_last_module_is_not_the_classifier(name, channels):
    """The SimKD reference code took `children()[-1]` as the head: wrong for these two."""
    split = split_model(create_model(name, num_classes=10, in_channels=1), X)
    assert split.feature_shape[0] == channels


@pytest.mark.parametrize("name", ["torchvision:mobilenet_v3_small", "torchvision:shufflenet_v2_x0_5"])
def test_torchvision_models_including_squeeze_excitation(name):
    model = create_model(name, num_classes=10, in_channels=1).eval()
    x = torch.randn(2, 1, 64, 64)
    split = split_model(model, x)
    torch.testing.assert_close(split.head(split.body(x)), model(x))
    assert split.feature_shape[1:] == (2, 2)  # the map before the final pool, not an SE block's pool


def test_explicit_node_and_helpful_errors():
    model = create_model("tiny_cnn", num_classes=3, in_channels=1)
    auto = split_model(model, X)
    forced = split_model(model, X, feature_node=auto.node)
    assert forced.node == auto.node

    with pytest.raises(UsageError, match="late candidates"):
        split_model(model, X, feature_node="nope", what="distill.student_feature_node")

    no_pool = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(2), nn.Linear(26 * 26, 3))
    with pytest.raises(UsageError, match="no global pooling found"):
        split_model(no_pool, X, what="teacher.arch")
