"""Loading and saving models between stages: teacher files, user checkpoints, shared data per run."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdpipe.errors import ConfigError, UsageError, describe, first_line
from kdpipe.ml.data.memory import Dataset, Splits
from kdpipe.ml.models.model_fit import DataFit, builder_hints, checkpoint_problem, fit_problem
from kdpipe.ml.models.preprocessing import with_adapter
from kdpipe.ml.models.weights import load_weights, save_weights  # noqa: F401 - save_weights re-exported
from kdpipe.ml.models.zoo import GrayToRGB, UnknownNameError, count_parameters, create_model  # noqa: F401 - re-exported

TEACHER_STATE = "teacher.pt"  # teachers committed before safetensors (spec without "weights")
TEACHER_WEIGHTS = "teacher.safetensors"
TEACHER_SCRIPT = "teacher.ts"
TEACHER_SPEC = "teacher.json"


def stage_data(ctx: Any) -> tuple[Dataset, Splits]:
    """The dataset and its splits (in memory or streamed), opened once per run and shared by its stages."""
    if "data" not in ctx.memo:
        from kdpipe.ml.data.imagedata import open_data

        ctx.memo["data"] = open_data(ctx.cfg)
    return ctx.memo["data"]


def load_state_dict_file(path: Path, key: str, allow_pickle: bool, source: str) -> dict[str, torch.Tensor]:
    """A user's weights file (safetensors, or a torch file read with ``weights_only=True`` unless opted out)."""
    return load_weights(path, key=key, source=source, allow_pickle=allow_pickle, opt_in="teacher.allow_pickle")


def load_into(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    key: str,
    arch: str,
    source: str,
    fit: DataFit | None = None,
    file: str = "the checkpoint",
) -> None:
    """Load ``state`` strictly; a mismatch is bad input, said in one line (with ``fit``, a stem or classifier
    made for other data than the config's says so: channels or classes)."""
    if isinstance(model, GrayToRGB) and not any(k.startswith("model.") for k in state):
        state = {f"model.{k}": v for k, v in state.items()}  # a torchvision checkpoint, wrapped for 1-channel data
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    reshaped = [k for k, v in state.items() if k in own and tuple(own[k].shape) != tuple(getattr(v, "shape", ()))]
    if reshaped and fit is not None:
        problem = checkpoint_problem(model, state, f"{file} ({arch})", fit)
        if problem:
            raise ConfigError(key, problem, source)
    if missing or unexpected or reshaped:
        parts = [
            f"{len(keys)} {what} (e.g. {keys[0]})"
            for keys, what in ((missing, "missing"), (unexpected, "unexpected"), (reshaped, "of another shape"))
            if keys
        ]
        raise ConfigError(key, f"the checkpoint does not fit '{arch}': {', '.join(parts)}", source)
    model.load_state_dict(state)


def build_teacher_model(spec: dict[str, Any]) -> nn.Module:
    """The teacher architecture of a teacher spec, freshly initialised (timm/python kwargs and image size too)."""
    h, w = spec["input_shape"][1:] if spec.get("input_shape") else (None, None)
    return create_model(
        spec["arch"],
        num_classes=spec["num_classes"],
        in_channels=spec["in_channels"],
        image_size=h if h == w else (h, w),
        kwargs=spec.get("kwargs") or None,
    )


def load_teacher(folder: Path) -> tuple[nn.Module, dict[str, Any]]:
    """The teacher committed by the teacher stage, in eval mode, and its spec.

    A teacher whose weights expect another normalisation than the data's comes behind its re-normalisation
    (spec ``input_adapter``, see :mod:`kdpipe.ml.models.preprocessing`), so every caller feeds it data-normalised input.
    """
    spec = json.loads((folder / TEACHER_SPEC).read_text())
    if spec["format"] == "torchscript":
        model = torch.jit.load(str(folder / TEACHER_SCRIPT), map_location="cpu")
    else:
        model = build_teacher_model(spec)
        weights = folder / spec.get("weights", TEACHER_STATE)
        model.load_state_dict(load_weights(weights, key="teacher", source=str(folder)))
    return with_adapter(model, spec.get("input_adapter")).eval(), spec


class Ensemble(nn.Module):
    """Several teachers as one model: the weighted mean of their logits, ``Σᵢ wᵢ·teacherᵢ(x)`` (weights
    normalised). What a student of several teachers replaces: it is validated, exported as one ONNX graph and
    benchmarked as the run's ``teacher``."""

    def __init__(self, members: list[nn.Module], weights: list[float], names: list[str]) -> None:
        super().__init__()
        if not (len(members) == len(weights) == len(names) > 1):
            raise ValueError("an ensemble needs two or more teachers, each with a weight and a name")
        self.members = nn.ModuleList(members)
        self.weights = [float(w) for w in weights]
        self.names = list(names)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.weights[0] * self.members[0](x)
        for w, member in zip(self.weights[1:], list(self.members)[1:], strict=True):
            out = out + w * member(x)
        return out


def load_teachers(
    folders: list[tuple[str, Path]], weights: list[float]
) -> tuple[nn.Module, list[tuple[str, nn.Module, dict[str, Any]]]]:
    """The teacher of a run (:func:`load_teacher` of its one folder) or, for several, their :class:`Ensemble`;
    and (name, model, spec) of each teacher."""
    loaded = [(name, *load_teacher(folder)) for name, folder in folders]
    if len(loaded) == 1:
        return loaded[0][1], loaded
    return Ensemble([m for _, m, _ in loaded], weights, [n for n, _, _ in loaded]).eval(), loaded


def frozen(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def load_script(path: Path, key: str, source: str) -> torch.jit.ScriptModule:
    """A TorchScript file; one that is not is bad input, said in one line."""
    try:
        return torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise ConfigError(key, f"{path.name} is not a TorchScript file ({first_line(exc, 120)})", source) from None


@contextmanager
def model_build_errors(
    key: str, source: str, label: str, channels: int, classes: int, *, placeholder: bool = False
) -> Iterator[None]:
    """Building a model for the data's images and classes: a name that does not resolve, or a constructor that
    cannot take them, is bad input at ``key`` in one line (the preflight and the stages say the same).
    ``placeholder``: the model was built for stand-in channels and classes (the data's are not known yet), so only
    the name was being checked and a constructor's failure is no error (the block is left, nothing is raised)."""
    try:
        yield
    except ConfigError:
        raise
    except (UnknownNameError, UsageError) as exc:
        raise ConfigError(key, str(exc), source) from None
    except Exception as exc:  # a constructor that cannot take these images or classes
        if placeholder:
            return
        message = f"{label} cannot be built for {channels}-channel images of {classes} classes"
        raise ConfigError(key, f"{message}: {describe(exc, limit=200)}", source) from None


def check_fits(model: nn.Module, label: str, fit: DataFit, key: str, source: str, builder: str = "") -> None:
    """The model must take the data's images and give one logit per class; else why not, in one line (see
    :mod:`kdpipe.ml.models.model_fit`). ``builder`` is the model's name when it says what built it (``python:``)."""
    problem = fit_problem(model, label, fit, builder_hints(builder))
    if problem:
        raise ConfigError(key, problem, source)
