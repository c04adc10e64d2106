"""The model zoo: CIFAR-style architectures used in the KD literature, plus torchvision, timm and user-code models.

Constructors are registered in :data:`MODELS` under their function name and all share the signature
``(num_classes: int = 10, in_channels: int = 3) -> nn.Module``. Every registered model is
``torch.fx.symbolic_trace``-able and ends with an explicit global average pool followed by a flatten, so a generic
body/head splitter can cut it at the input of the last pooling op.
"""

from kdpipe.ml.models.zoo import (  # noqa: F401 - registers the models and adapters
    mobilenetv2,
    resnet_cifar,
    shufflenetv2,
    timm_models,
    tiny,
    user_code,
    wrn,
)
from kdpipe.ml.models.zoo.base import (
    MODELS,
    TORCHVISION_PREFIX,
    GrayToRGB,
    UnknownNameError,
    count_parameters,
    create_model,
    model_names,
)

__all__ = [
    "MODELS",
    "TORCHVISION_PREFIX",
    "GrayToRGB",
    "UnknownNameError",
    "count_parameters",
    "create_model",
    "model_names",
]
