"""Body/head split through timm's model contract: ``forward_features`` is the body, ``forward_head`` the head.

Every timm model (CNN or ViT) and any user model with the same two methods is cut this way instead of by
tracing, so models fx cannot trace, or whose last global pool is not where the features end, still split.

Two modes, chosen from what ``forward_features`` gives for an example batch:

* ``map``: an (N, C, H, W) map with C = ``num_features`` (ResNet, EfficientNet, ConvNeXt, MobileNetV3, …).
  The body is ``forward_features``, the head ``forward_head`` (pooling, any pre-logits layers, classifier).
* ``pre_logits``: anything else, e.g. a ViT's (N, tokens, D) sequence or a channels-last map. Tokens have no
  spatial layout a CNN student's map could match (a class token, then patches in an order the head may pool
  or not), so the representation aligned is the one the classifier reads: ``forward_head(pre_logits=True)``
  (the pooled token after the final norm, D values), given as an (N, D, 1, 1) map. The head is then the
  classifier alone (``get_classifier()``), fed the flattened map. A student aligned with it (SimKD, FitNet)
  feeds the teacher's own classifier exactly the kind of vector the teacher feeds it.

Body and head are copies of the model with the top-level children they never call replaced by
``nn.Identity`` (checked: the output must not change), so a student built on the body does not carry the
model's classifier, and a reused head does not carry the teacher's backbone.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from kdpipe.errors import UsageError, first_line

MAP, PRE_LOGITS = "map", "pre_logits"


def has_contract(model: nn.Module) -> bool:
    """Whether ``model`` offers timm's body/head contract."""
    return callable(getattr(model, "forward_features", None)) and callable(getattr(model, "forward_head", None))


class ContractBody(nn.Module):
    """``forward_features`` (``map``), or ``forward_head(forward_features(x), pre_logits=True)`` as (N, D, 1, 1)."""

    def __init__(self, model: nn.Module, mode: str) -> None:
        super().__init__()
        self.model = model
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.model.forward_features(x)
        if self.mode == MAP:
            return features
        pooled = self.model.forward_head(features, pre_logits=True)
        return pooled.reshape(pooled.shape[0], -1, 1, 1)


class ContractHead(nn.Module):
    """``forward_head`` of a map (``map``), or the classifier on the flattened pre-logits (``pre_logits``)."""

    def __init__(self, module: nn.Module, mode: str) -> None:
        super().__init__()
        self.net = module
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == MAP:
            return self.net.forward_head(x)
        return self.net(torch.flatten(x, 1))


def contract_parts(model: nn.Module, mode: str) -> tuple[nn.Module, nn.Module]:
    """Body and head as views on ``model`` itself (no copy): training them trains ``model`` (FitNet)."""
    head = model if mode == MAP else model.get_classifier()
    return ContractBody(model, mode), ContractHead(head, mode)


def _trim(model: nn.Module, run: Callable[[nn.Module], torch.Tensor]) -> nn.Module:
    """``model`` with the top-level children that ``run`` never calls replaced by ``nn.Identity``.

    Kept whole when dropping them changes the output (a child used without being called, e.g. its weight
    read directly).
    """
    called: set[str] = set()
    hooks = [
        child.register_forward_pre_hook(lambda *_, name=name: called.add(name))
        for name, child in model.named_children()
    ]
    try:
        with torch.no_grad():
            reference = run(model)
    finally:
        for hook in hooks:
            hook.remove()
    unused = {name: child for name, child in model.named_children() if name not in called}
    if not unused:
        return model
    for name in unused:
        setattr(model, name, nn.Identity())
    try:
        with torch.no_grad():
            same = torch.allclose(run(model), reference)
    except Exception:
        same = False
    if not same:
        for name, child in unused.items():
            setattr(model, name, child)
    return model


def contract_mode(model: nn.Module, features: torch.Tensor) -> str:
    """``map`` for an (N, num_features, H, W) output of ``forward_features``, ``pre_logits`` otherwise."""
    channels = getattr(model, "num_features", None)
    if features.ndim == 4 and (channels is None or features.shape[1] == channels):
        return MAP
    return PRE_LOGITS


def contract_split(model: nn.Module, example: torch.Tensor, what: str) -> tuple[nn.Module, nn.Module, str, tuple]:
    """(body, head, mode, feature shape (C, H, W)) of a model with timm's contract; see the module docstring."""
    model = copy.deepcopy(model).eval()
    with torch.no_grad():
        try:
            features = model.forward_features(example)
            logits = model(example)
        except Exception as exc:
            shape = tuple(example.shape[1:])
            raise UsageError(f"{what}: forward_features fails on {shape} inputs: {first_line(exc)}") from None
    mode = contract_mode(model, features)
    if mode == PRE_LOGITS and not callable(getattr(model, "get_classifier", None)):
        raise UsageError(
            f"{what}: forward_features gives {tuple(features.shape[1:])}, not a (C, H, W) map, and the model has no "
            "get_classifier() to reuse on its pre-logits"
        )
    body = ContractBody(_trim(copy.deepcopy(model), lambda m: ContractBody(m, mode)(example)), mode).eval()
    with torch.no_grad():
        mapped = body(example)
    if mode == MAP:
        head = ContractHead(_trim(copy.deepcopy(model), lambda m: m.forward_head(mapped)), mode).eval()
    else:
        head = ContractHead(copy.deepcopy(model.get_classifier()), mode).eval()
    with torch.no_grad():
        rejoined = head(mapped)
    if rejoined.shape != logits.shape or not torch.allclose(rejoined, logits, rtol=1e-4, atol=1e-5):
        raise UsageError(
            f"{what}: forward_head(forward_features(x)) is not forward(x) for this model, so it cannot be cut "
            "through timm's contract; set the feature node by hand to cut it with torch.fx"
        )
    return body, head, mode, tuple(mapped.shape[1:])
