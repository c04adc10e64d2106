"""Split any fx-traceable classifier into body (input → last feature map) and head (the rest).

The last feature map is the input of the model's global pooling: the last pooling-like op
(adaptive/avg/max pool, mean over H and W, flatten, view) that turns an (N, C, H, W) map into one
value per channel. This works whatever the model's last module is (MobileNetV2, ShuffleNetV2 end with
convolutions and a pool hidden in ``forward``), which the SimKD reference code could not handle.
Shapes are fixed once here, when the model is built, so no teacher forward is ever needed to read them.

Models with timm's contract (``forward_features`` / ``forward_head``: every timm model, CNN or ViT) are cut
through it instead (:mod:`kdpipe.ml.models.contract_split`), unless a feature node is named.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from kdpipe.errors import UsageError
from kdpipe.ml.models.contract_split import MAP, contract_split, has_contract
from kdpipe.ml.models.preprocessing import Preprocessed

_POOL_MODULES = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d, nn.MaxPool2d, nn.Flatten)
_POOL_FUNCTIONS = {
    torch.nn.functional.adaptive_avg_pool2d,
    torch.nn.functional.adaptive_max_pool2d,
    torch.nn.functional.avg_pool2d,
    torch.nn.functional.max_pool2d,
    torch.mean,
    torch.amax,
    torch.flatten,
}
_POOL_METHODS = {"mean", "amax", "flatten", "view", "reshape", "squeeze"}


@dataclass(frozen=True)
class Split:
    """A model cut in two at ``node``; ``feature_shape`` is (C, H, W) for the example input size.

    ``mode`` says how: ``fx`` (traced, cut at the last global pool), ``map`` (timm's forward_features /
    forward_head) or ``pre_logits`` (a token model's pooled pre-logits as a (D, 1, 1) map, the head its
    classifier); see :mod:`kdpipe.ml.models.contract_split`. ``node`` names the cut for reports.
    """

    body: nn.Module
    head: nn.Module
    node: str
    feature_shape: tuple[int, int, int]
    mode: str = "fx"


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _is_global_pool(node: fx.Node, gm: fx.GraphModule) -> bool:
    if not node.args or not isinstance(node.args[0], fx.Node):
        return False
    src, out = _shape(node.args[0]), _shape(node)
    if src is None or out is None or len(src) != 4:
        return False
    if node.op == "call_module":
        kind_ok = isinstance(gm.get_submodule(str(node.target)), _POOL_MODULES)
    elif node.op == "call_function":
        kind_ok = node.target in _POOL_FUNCTIONS
    elif node.op == "call_method":
        kind_ok = node.target in _POOL_METHODS
    else:
        kind_ok = False
    per_sample = 1
    for d in out[1:]:
        per_sample *= d
    return kind_ok and per_sample == src[1]


def _candidates(gm: fx.GraphModule) -> list[str]:
    return [n.name for n in gm.graph.nodes if (s := _shape(n)) is not None and len(s) == 4][-8:]


def find_feature_node(gm: fx.GraphModule) -> fx.Node:
    """The input of the model's last global pool; a chain such as avgpool → flatten is walked back whole.

    Taking the *last* pool skips squeeze-excitation pools inside the body.
    """
    pools = [n for n in gm.graph.nodes if _is_global_pool(n, gm)]
    if not pools:
        raise LookupError
    src = pools[-1].args[0]
    while src in pools:
        src = src.args[0]
    return src  # type: ignore[return-value]


def _subgraph(gm: fx.GraphModule, inputs: list[fx.Node], output: fx.Node | tuple) -> fx.GraphModule:
    """A new GraphModule computing ``output`` from ``inputs`` (placeholders), sharing gm's submodules."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in inputs:
        env[node] = graph.placeholder(node.name if node.op != "placeholder" else str(node.target))
    for node in gm.graph.nodes:
        if node in env or node.op in ("placeholder", "output"):
            continue
        deps = node.all_input_nodes
        if all(d in env for d in deps):
            env[node] = graph.node_copy(node, lambda n: env[n])
    try:
        out = fx.node.map_arg(gm.graph.output_node().args[0] if output == () else output, lambda n: env[n])
    except KeyError as exc:
        raise UsageError(f"the part after the feature node also needs '{exc.args[0]}'; choose another node") from None
    graph.output(out)
    module = fx.GraphModule(gm, graph)
    module.graph.eliminate_dead_code()
    module.delete_all_unused_submodules()
    module.recompile()
    return module


def split_model(model: nn.Module, example: torch.Tensor, feature_node: str | None = None, what: str = "model") -> Split:
    """Cut ``model`` at its last feature map.

    Args:
        model: a classifier; must be traceable by ``torch.fx.symbolic_trace``.
        example: one input batch (only its shape matters); used once to propagate shapes.
        feature_node: force the cut at this fx node name instead of finding it.
        what: the config key naming the model, used in error messages.
    """
    if isinstance(model, Preprocessed):  # the teacher's own normalisation starts its body
        inner = split_model(model.model, model.renorm(example), feature_node, what)
        body = nn.Sequential(copy.deepcopy(model.renorm), inner.body)
        return dataclasses.replace(inner, body=body)
    if feature_node is None and has_contract(model):
        body, head, mode, shape = contract_split(model, example, what)
        node = "forward_features" if mode == MAP else "forward_head(pre_logits=True)"
        return Split(body=body, head=head, node=node, feature_shape=shape, mode=mode)  # type: ignore[arg-type]
    model = copy.deepcopy(model).eval()
    try:
        gm = fx.symbolic_trace(model)
    except Exception as exc:
        raise UsageError(
            f"{what}: cannot be traced by torch.fx ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); "
            "SimKD needs the model's last feature map: use an fx-traceable model"
        ) from None
    with torch.no_grad():
        ShapeProp(gm).propagate(example)
    nodes = {n.name: n for n in gm.graph.nodes}
    if feature_node:
        node = nodes.get(feature_node)
        if node is None or _shape(node) is None or len(_shape(node)) != 4:
            raise UsageError(
                f"{what}: '{feature_node}' is not a node with an (N, C, H, W) output; "
                f"late candidates: {', '.join(_candidates(gm))}"
            )
    else:
        try:
            node = find_feature_node(gm)
        except LookupError:
            raise UsageError(
                f"{what}: no global pooling found, so the last feature map is unknown; set the feature node "
                f"by hand (one of: {', '.join(_candidates(gm))})"
            ) from None
    placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
    body = _subgraph(gm, [placeholder], node)
    head = _subgraph(gm, [node], ())
    if any(n.op == "placeholder" and n.name != node.name for n in head.graph.nodes):
        raise UsageError(f"{what}: the head after '{node.name}' also reads the input; choose another feature node")
    shape = _shape(node)
    return Split(body=body, head=head, node=node.name, feature_shape=tuple(shape[1:]))  # type: ignore[arg-type]
