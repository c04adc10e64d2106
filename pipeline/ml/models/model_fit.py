"""Does a model take the data? One forward pass on a zero batch of the data's shape, its failure diagnosed.

A model from the user's code, a timm name with kwargs, or a checkpoint can be made for other data than the
config's: a stem hard-coded for RGB, a classifier for another class count, a flatten sized for another image
size. Such a model used to fail deep inside a stage (torch.fx's shape propagation, the training loop) as an
internal error. Here it is one line naming the model, what it got and what it needed, with the ways out: the
builder's own arguments (a ``python:`` function is offered ``in_channels``, ``num_classes`` and ``image_size``)
and the data settings that exist for this dataset and accept the value (checked against the config schema:
``data.synthetic.*`` for the synthetic set, ``data.channels`` / ``data.image_size`` for image datasets; the
built-in datasets fix their own shape, so nothing is suggested there).

Torch is imported only by the functions that run a model.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kdpipe.config import FILE_DATASETS, DataConfig
from kdpipe.errors import describe

if TYPE_CHECKING:
    import torch
    from torch import nn

#: what a data setting changes → the key that sets it, per kind of dataset (only keys the config has)
SETTINGS = {
    "synthetic": {
        "channels": "data.synthetic.channels",
        "image_size": "data.synthetic.image_size",
        "classes": "data.synthetic.num_classes",
    },
    "files": {"channels": "data.channels", "image_size": "data.image_size"},
}
#: what a ``python:`` builder can do about each mismatch: (the argument it is offered, what to do when the
#: function takes it, what to do when it does not)
USER_CODE = {
    "channels": ("in_channels", "build the stem from in_channels", "take in_channels and build the stem from it"),
    "classes": ("num_classes", "build the classifier from num_classes", "take num_classes and build the head from it"),
    "image_size": ("image_size", "build it for image_size", "take image_size and build it for that size"),
}
_CONV = re.compile(r"expected input\[(\d+(?:, \d+)*)\] to have (\d+) channels, but got (\d+) channels")
_MATMUL = re.compile(r"mat1 and mat2 shapes cannot be multiplied \((\d+)x(\d+) and (\d+)x(\d+)\)")
_TOO_SMALL = re.compile(r"Kernel size can't be greater than actual input size|Output size is too small")


@dataclass(frozen=True)
class DataFit:
    """What a model must take (``channels`` × ``height`` × ``width`` images) and give (``classes`` logits), and
    the data section whose settings may be suggested (None: suggest none)."""

    channels: int
    height: int
    width: int
    classes: int
    data: DataConfig | None = None

    @classmethod
    def of(cls, data: DataConfig | None, input_shape: tuple[int, ...], classes: int) -> DataFit:
        c, h, w = (int(v) for v in input_shape)
        return cls(c, h, w, int(classes), data)

    @property
    def images(self) -> str:
        return f"{self.channels}×{self.height}×{self.width} images"

    def setting(self, what: str, value: int | None = None) -> str | None:
        """``set KEY: VALUE`` (``set KEY`` without a value) when this dataset has a setting for ``what`` that
        takes ``value``; None when it has none (the built-in datasets) or the schema refuses the value."""
        if self.data is None:
            return None
        kind = "files" if self.data.dataset in FILE_DATASETS else self.data.dataset
        key = SETTINGS.get(kind, {}).get(what)
        if key is None:
            return None
        if value is None:
            return f"set {key}"
        return f"set {key}: {value}" if _accepts(self.data, key, value) else None


def _accepts(data: DataConfig, key: str, value: int) -> bool:
    """Whether the data section validates with ``key`` (``data.a.b``) set to ``value``."""
    from pydantic import ValidationError

    fields = data.model_dump()
    *path, last = key.split(".")[1:]
    node = fields
    for part in path:
        node = node[part]
    node[last] = value
    try:
        type(data).model_validate(fields)
    except ValidationError:
        return False
    return True


def _ways_out(*options: str | None) -> str:
    """`` (a, b or c)`` of the options that exist; nothing when none does."""
    found = [o for o in options if o]
    if not found:
        return ""
    return f" ({', '.join(found[:-1])} or {found[-1]})" if len(found) > 1 else f" ({found[0]})"


def builder_hints(name: str) -> dict[str, str]:
    """What the model's builder can change: a ``python:`` function builds from the arguments it is offered (or
    is told to take them); zoo, timm and torchvision models are already built from the data's shape."""
    from kdpipe.ml.models.entrypoints import PYTHON_PREFIX, accepted_args, load_callable, parse_entrypoint

    if not name.startswith(PYTHON_PREFIX):
        return {}
    takes = accepted_args(load_callable(parse_entrypoint(name[len(PYTHON_PREFIX) :])))
    return {what: use if arg in takes else take for what, (arg, use, take) in USER_CODE.items()}


@dataclass
class _Failure:
    """Where a forward pass failed: the innermost module that was running, its name and its input's shape."""

    exc: Exception
    module: Any = None
    name: str = ""
    input_shape: tuple[int, ...] | None = None

    @property
    def where(self) -> str:
        kind = type(self.module).__name__
        if self.module is None:
            return "a layer"
        return f"layer '{self.name}' ({kind})" if self.name else f"{kind}.forward"


def _forward(model: nn.Module, x: torch.Tensor) -> tuple[Any, _Failure | None]:
    """``model(x)``, or the failure with the module that raised it (found by hooks; a TorchScript module has
    none, so only the exception's text tells)."""
    import torch

    running: list[tuple[Any, tuple[int, ...] | None]] = []
    names = {id(m): n for n, m in model.named_modules() if not isinstance(m, torch.jit.ScriptModule)}

    def enter(module: Any, args: tuple) -> None:
        first = args[0] if args else None
        running.append((module, tuple(first.shape) if isinstance(first, torch.Tensor) else None))

    def leave(module: Any, args: tuple, out: Any) -> None:
        while running and running.pop()[0] is not module:
            pass  # a module that swallowed its child's exception left the child open

    handles = []
    for module in model.modules():
        if id(module) in names:
            handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    try:
        with torch.no_grad():
            return model(x), None
    except Exception as exc:
        if not running:
            return None, _Failure(exc)
        module, shape = running[-1]
        return None, _Failure(exc, module, names.get(id(module), ""), shape)
    finally:
        for h in handles:
            h.remove()


def fit_problem(model: nn.Module, label: str, fit: DataFit, builder: Mapping[str, str] | None = None) -> str | None:
    """Why ``model`` cannot take the data (one line, starting with ``label``), or None when it can.

    The model runs in eval mode on a zero batch of two images of the data's shape (its train/eval mode is
    restored); its output must be one (N, classes) tensor of logits.
    """
    import torch

    builder = builder or {}
    was_training = model.training
    x = torch.zeros(2, fit.channels, fit.height, fit.width)
    try:
        out, failed = _forward(model.eval(), x)
    finally:
        model.train(was_training)
    if failed is not None:
        return _failure_message(failed, label, fit, tuple(x.shape), builder)
    return _output_problem(out, label, fit, builder)


def _failure_message(
    failed: _Failure, label: str, fit: DataFit, example: tuple[int, ...], builder: Mapping[str, str]
) -> str:
    from torch import nn

    module, shape, text = failed.module, failed.input_shape, str(failed.exc)
    conv = None
    if isinstance(module, nn.modules.conv._ConvNd) and shape and len(shape) > 1 and shape[1] != module.in_channels:
        conv = (shape, module.in_channels, shape[1])
    elif m := _CONV.search(text):
        conv = (tuple(int(v) for v in m.group(1).split(", ")), int(m.group(2)), int(m.group(3)))
    if conv is not None:
        given, wants, gets = conv
        if given == example:  # the images themselves reach this convolution: the stem
            ways = _ways_out(fit.setting("channels", wants), builder.get("channels"))
            return f"{label} expects {wants} input channel{'s' * (wants != 1)}; the data has {gets}{ways}"
        return (
            f"{label} fails on {fit.images}: {failed.where} expects {wants} channels but the layer before it gives "
            f"{gets} (its layers do not fit together)"
        )
    linear = None
    if isinstance(module, nn.Linear) and shape and shape[-1] != module.in_features:
        linear = (module.in_features, shape[-1])
    elif m := _MATMUL.search(text):
        linear = (int(m.group(3)), int(m.group(2)))
    if linear is not None:
        wants, gets = linear
        size = fit.setting("image_size")
        ways = _ways_out(size and f"{size} to the size it was built for", builder.get("image_size"), "pool globally")
        return (
            f"{label} fails on {fit.images}: {failed.where} expects {wants} input features, gets {gets}; was it "
            f"built for another image size?{ways}"
        )
    if _TOO_SMALL.search(text):
        size = f"a {shape[-2]}×{shape[-1]} map" if shape and len(shape) >= 3 else "a map"
        larger = fit.setting("image_size")
        ways = _ways_out(larger and larger.replace("set ", "set a larger ", 1), builder.get("image_size"))
        too_small = f"{failed.where} gets {size}, smaller than its window: the images are too small for it"
        return f"{label} fails on {fit.images}: {too_small}{ways}"
    where = f" in {failed.where}" if failed.module is not None else ""
    return f"{label} fails on a zero batch of {fit.images}{where}: {describe(failed.exc, limit=200)}"


def _output_problem(out: Any, label: str, fit: DataFit, builder: Mapping[str, str]) -> str | None:
    import torch

    k = fit.classes
    if not isinstance(out, torch.Tensor):
        what = (
            f"a {type(out).__name__} of {len(out)}"
            if isinstance(out, tuple | list | dict)
            else f"a {type(out).__name__}"
        )
        return f"{label} returns {what} from forward, not a tensor of logits (return one (N, {k}) tensor)"
    if out.ndim != 2 or out.shape[0] != 2:
        return (
            f"{label} gives outputs of shape {tuple(out.shape)} for 2 {fit.images}, not (2, {k}) class logits "
            "(pool and flatten before the classifier?)"
        )
    if out.shape[1] != k:
        n = int(out.shape[1])
        ways = _ways_out(fit.setting("classes", n), builder.get("classes"))
        return f"{label} gives {n} logits per image; the data has {k} classes{ways}"
    return None


def checkpoint_problem(model: nn.Module, state: Mapping[str, Any], label: str, fit: DataFit) -> str | None:
    """Why the weights ``state`` cannot fit ``model`` built for this data, when the reason is the data: a stem
    trained on another channel count, a classifier for another class count. None for other mismatches."""
    from torch import nn

    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.modules.conv._ConvNd)]
    convs = [(n, m) for n, m in layers if isinstance(m, nn.modules.conv._ConvNd)]
    if convs:
        name, stem = convs[0]
        theirs = tuple(getattr(state.get(f"{name}.weight"), "shape", ()))
        ours = tuple(stem.weight.shape)
        if (
            len(theirs) == len(ours)
            and ours[1] == fit.channels != theirs[1]
            and theirs[:1] + theirs[2:] == ours[:1] + ours[2:]
        ):
            ways = _ways_out(fit.setting("channels", theirs[1]))
            return (
                f"{label} was trained on {theirs[1]}-channel images ('{name}.weight' is {list(theirs)}); the data has "
                f"{fit.channels}{ways}"
            )
    heads = [(n, m) for n, m in layers if m.weight.shape[0] == fit.classes]
    if heads:
        name, head = heads[-1]
        theirs = tuple(getattr(state.get(f"{name}.weight"), "shape", ()))
        ours = tuple(head.weight.shape)
        if len(theirs) == len(ours) and theirs[0] != fit.classes and theirs[1:] == ours[1:]:
            ways = _ways_out(fit.setting("classes", theirs[0]))
            return (
                f"{label} holds a classifier for {theirs[0]} classes ('{name}.weight' is {list(theirs)}); the data "
                f"has {fit.classes} classes{ways}"
            )
    return None
