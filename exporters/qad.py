"""Fake quantisation that matches ONNX Runtime's static int8 kernels, for quantisation-aware distillation (QAD).

ORT's ``int8_static`` (U8S8 QDQ, see :func:`~kdpipe.exporters.variants.make_int8_static`) first folds every
BatchNorm into its Conv (``quant_pre_process``), then quantises:

* weights per output channel, symmetric int8 in [-127, 127]: ``scale = max|w_c| / 127``, zero point 0;
* activations per tensor, asymmetric uint8: the calibrated range widened to include 0,
  ``scale = (max - min) / 255``, ``zero_point = round(-min / scale)``; the input of every Conv/Gemm and its output,
  where a following Relu (Clip for ReLU6) is dropped and the output range starts at 0 instead.

:func:`attach` puts exactly that into a PyTorch model in place: each Conv2d/Linear (with the BatchNorm that follows
it) becomes a :class:`QuantConv`/:class:`QuantLinear` that computes with BN-folded, fake-quantised weights and
fake-quantises its input and output with straight-through gradients. Activation ranges are min/max over the
calibration images (:func:`calibrate`, what ORT's MinMax calibrator computes) and stay fixed while training;
weight scales follow the weights. :func:`detach` puts the original modules back, holding the fine-tuned weights,
so the student exports to fp32 ONNX as usual and ORT quantises it with its own kernels.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import fx, nn

QMIN, QMAX = 0, 255  # uint8 activations
WMAX = 127  # symmetric int8 weights use [-127, 127]
_ACTS = {nn.ReLU: 6.0e30, nn.ReLU6: 6.0, F.relu: 6.0e30, F.relu6: 6.0, torch.relu: 6.0e30}


class ActQuant(nn.Module):
    """Per-tensor uint8 fake quantisation with a min/max range; observes instead while ``observing``."""

    def __init__(self, low: float | None = None, high: float | None = None) -> None:
        super().__init__()
        self.register_buffer("min", torch.tensor(float("inf")))
        self.register_buffer("max", torch.tensor(float("-inf")))
        self.low, self.high = low, high  # clamps a following activation imposes (Relu: 0; ReLU6: 0 and 6)
        self.observing = False

    def scale_zero_point(self) -> tuple[float, int]:
        lo, hi = float(self.min), float(self.max)
        if self.low is not None:
            lo = max(lo, self.low)
        if self.high is not None:
            hi = min(hi, self.high)
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        if hi == lo:
            return 1.0, 0
        scale = (hi - lo) / (QMAX - QMIN)
        return scale, int(min(QMAX, max(QMIN, round(QMIN - lo / scale))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            self.min.fill_(min(float(self.min), float(x.detach().min())))
            self.max.fill_(max(float(self.max), float(x.detach().max())))
            return x
        if not torch.isfinite(self.min):
            raise RuntimeError("fake quantisation has no range: run calibrate() first")
        scale, zero_point = self.scale_zero_point()
        return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, QMIN, QMAX)


def quantize_weight(w: torch.Tensor, per_channel: bool = True) -> torch.Tensor:
    """Symmetric int8 fake quantisation per output channel (axis 0), as ORT quantises Conv/Gemm weights, or with
    one scale for the whole tensor (``per_channel=False``, ORT's ``per_channel: false``)."""
    absmax = w.detach().abs().reshape(w.shape[0], -1).amax(dim=1)
    if not per_channel:
        absmax = absmax.max().expand(w.shape[0])
    scale = torch.where(absmax > 0, absmax / WMAX, torch.ones_like(absmax)).float()
    zero = torch.zeros(w.shape[0], dtype=torch.int32, device=w.device)
    return torch.fake_quantize_per_channel_affine(w, scale, zero, 0, -WMAX, WMAX)


def fold(conv_weight: torch.Tensor, conv_bias: torch.Tensor | None, bn: nn.BatchNorm2d | None) -> tuple:
    """BN folded into the conv: ``w·γ/σ`` and ``β + (b − μ)·γ/σ`` (running statistics, frozen)."""
    if bn is None:
        return conv_weight, conv_bias
    inv = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bias = conv_bias if conv_bias is not None else torch.zeros_like(bn.running_mean)
    return conv_weight * inv.reshape(-1, *([1] * (conv_weight.dim() - 1))), bn.bias + (bias - bn.running_mean) * inv


class QuantConv(nn.Module):
    """Conv2d (+ the BatchNorm after it), computed as ORT's QLinearConv would: quantised in, weights and out."""

    def __init__(
        self, conv: nn.Conv2d, bn: nn.BatchNorm2d | None, act_high: float | None, per_channel: bool = True
    ) -> None:
        super().__init__()
        self.conv, self.bn, self.per_channel = conv, bn, per_channel
        self.input_quant = ActQuant()
        self.output_quant = ActQuant(0.0, act_high) if act_high is not None else ActQuant()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = fold(self.conv.weight, self.conv.bias, self.bn)
        c = self.conv
        y = F.conv2d(
            self.input_quant(x),
            quantize_weight(weight, self.per_channel),
            bias,
            c.stride,
            c.padding,
            c.dilation,
            c.groups,
        )
        return self.output_quant(y)


class QuantLinear(nn.Module):
    """Linear as ORT's quantised Gemm: uint8 input and output, per-channel int8 weights."""

    def __init__(self, linear: nn.Linear, act_high: float | None, per_channel: bool = True) -> None:
        super().__init__()
        self.linear, self.per_channel = linear, per_channel
        self.input_quant = ActQuant()
        self.output_quant = ActQuant(0.0, act_high) if act_high is not None else ActQuant()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_quant(
            F.linear(self.input_quant(x), quantize_weight(self.linear.weight, self.per_channel), self.linear.bias)
        )


def _single_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _activation(node: fx.Node | None, modules: dict[str, nn.Module]) -> float | None:
    """The upper clamp of a Relu/ReLU6 at ``node`` (huge for Relu), None when it is not one."""
    if node is None:
        return None
    if node.op == "call_module":
        return _ACTS.get(type(modules[node.target]))
    if node.op in ("call_function", "call_method"):
        if node.target in ("relu", "relu_"):
            return 6.0e30
        return _ACTS.get(node.target)  # type: ignore[arg-type]
    return None


class _Tracer(fx.Tracer):
    """torch.fx's tracer, keeping every BatchNorm2d subclass whole (timm's ``BatchNormAct2d``: BN + activation in
    one module) so that the BN after a conv is found whatever library built the model."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, nn.BatchNorm2d) or super().is_leaf_module(m, module_qualified_name)


def _bn_activation(bn: nn.BatchNorm2d) -> tuple[nn.Module, float | None]:
    """What stays in a BatchNorm's place once it is folded, and the clamp that follows the conv.

    A plain BatchNorm2d leaves an Identity (the clamp is the next node's); timm's ``BatchNormAct2d`` applies its
    own activation after the normalisation, so its ``act`` (and ``drop``) stay in the model."""
    act = getattr(bn, "act", None)
    if not isinstance(act, nn.Module):
        return nn.Identity(), None
    drop = getattr(bn, "drop", None)
    keep = nn.Sequential(drop, act) if isinstance(drop, nn.Module) and not isinstance(drop, nn.Identity) else act
    return keep, _ACTS.get(type(act))


def attach(model: nn.Module, per_channel: bool = True) -> list[str]:
    """Swap ``model``'s Conv2d(+BN)/Linear modules in place for fake-quantised ones; returns the swapped names.

    The model is traced with torch.fx only to find which BatchNorm and activation follow each layer; the swap
    keeps every qualified parameter name under the new module (``conv.weight`` → ``conv.conv.weight``), so the
    model's own forward (and any method that calls its parts) runs through the fake quantisers.
    """
    graph = _Tracer().trace(model)
    modules = dict(model.named_modules())
    swapped = []
    for node in graph.nodes:
        if node.op != "call_module" or type(modules[node.target]) not in (nn.Conv2d, nn.Linear):
            continue
        layer, nxt = modules[node.target], _single_user(node)
        bn, keep, high = None, None, None
        if isinstance(layer, nn.Conv2d) and nxt is not None and nxt.op == "call_module":
            if isinstance(modules[nxt.target], nn.BatchNorm2d):
                bn, bn_name = modules[nxt.target], nxt.target
                keep, high = _bn_activation(bn)
                if high is None and isinstance(keep, nn.Identity):
                    nxt = _single_user(nxt)
                else:
                    nxt = None
        if high is None:
            high = _activation(nxt, modules)
        if bn is not None:
            model.set_submodule(bn_name, keep)
            # what is left of the BN takes its place in the model; its statistics live on inside the QuantConv
        if isinstance(layer, nn.Conv2d):
            quant: nn.Module = QuantConv(layer, bn, high, per_channel)
        else:
            quant = QuantLinear(layer, high, per_channel)
        quant.bn_name = bn_name if bn is not None else None  # type: ignore[assignment]
        model.set_submodule(node.target, quant)
        swapped.append(node.target)
    return swapped


#: a channel whose BatchNorm running variance is below this fraction of the BN's eps has a constant conv output
DEAD_VARIANCE = 1.0e-4


@torch.no_grad()
def settle_dead_channels(model: nn.Module) -> dict[str, int]:
    """Zero the weights of conv channels whose output never varies; returns ``{layer: channels}``.

    A channel fed only zeros (a ReLU that never fires upstream) has running variance ~0, so folding its BatchNorm
    multiplies its weights by ``γ/√eps`` (~300γ): one such channel sets a per-tensor weight scale hundreds of times
    too coarse for all the others, and static int8 of the whole layer collapses (what ORT's ``per_channel: false``
    does to many trained MobileNetV2s). Its output is the constant β whatever the weights are, so setting its
    weights, conv bias and running mean to 0 keeps the fp32 function (to within the channel's √var·γ/√eps) and
    gives the layer back a weight scale that fits its live channels. Runs on an :func:`attach`-ed model.
    """
    settled = {}
    for name, module in model.named_modules():
        if not isinstance(module, QuantConv) or module.bn is None:
            continue
        bn = module.bn
        dead = bn.running_var < DEAD_VARIANCE * bn.eps
        if bool(dead.any()):
            module.conv.weight[dead] = 0.0
            if module.conv.bias is not None:
                module.conv.bias[dead] = 0.0
            bn.running_mean[dead] = 0.0
            settled[name] = int(dead.sum())
    return settled


def quantizers(model: nn.Module) -> Iterator[ActQuant]:
    return (m for m in model.modules() if isinstance(m, ActQuant))


@torch.no_grad()
def calibrate(model: nn.Module, images: torch.Tensor, batch_size: int = 32) -> None:
    """Set every activation range to its min/max over ``images`` (ORT's MinMax calibration on the same data)."""
    was_training = model.training
    model.eval()
    for q in quantizers(model):
        q.min.fill_(float("inf"))
        q.max.fill_(float("-inf"))
        q.observing = True
    try:
        device = next(model.parameters()).device
        for start in range(0, len(images), batch_size):
            model(images[start : start + batch_size].to(device))
    finally:
        for q in quantizers(model):
            q.observing = False
    model.train(was_training)


def detach(model: nn.Module, names: list[str]) -> nn.Module:
    """Undo :func:`attach`: the original Conv2d/BN/Linear modules go back, holding the fine-tuned weights."""
    for name in names:
        quant = model.get_submodule(name)
        if isinstance(quant, QuantConv):
            model.set_submodule(name, quant.conv)
            if quant.bn is not None:
                model.set_submodule(quant.bn_name, quant.bn)
        else:
            model.set_submodule(name, quant.linear)
    return model
