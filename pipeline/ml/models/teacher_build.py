"""Building the teacher a config asks for: its architecture name, constructor, weights and preprocessing.

One place for what the teacher stage needs from every source (zoo, ``torchvision:``, ``timm:``, ``python:``
user code), so the stage keeps to its own job (train or load, evaluate, commit). Torch is imported only to
build: the fingerprints (:func:`teacher_code`, :func:`weights_path`) serve ``kdpipe status`` too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdpipe.config import LoadedConfig, TeacherConfig
from kdpipe.errors import ConfigError, UsageError
from kdpipe.ml.models.entrypoints import PYTHON_PREFIX, model_label, parse_entrypoint, source_file

if TYPE_CHECKING:
    from torch import nn


def teacher_arch(conf: TeacherConfig, base: Path) -> str:
    """The model name the teacher is built from: ``python:/abs/file.py:func`` for user code, else ``arch``."""
    if conf.source == "python":
        return PYTHON_PREFIX + str(parse_entrypoint(conf.entrypoint or "", base))
    return conf.arch or ""


def teacher_code(cfg: LoadedConfig) -> Path | None:
    """The user's source file of a ``source: python`` teacher (its bytes are part of the cache key)."""
    conf = cfg.config.teacher
    if conf.source != "python":
        return None
    try:
        return source_file(parse_entrypoint(conf.entrypoint or "", cfg.base))
    except UsageError as exc:
        raise ConfigError("teacher.entrypoint", str(exc), cfg.source) from None


def weights_path(cfg: LoadedConfig) -> Path | None:
    """The weights file the teacher is loaded from, if any (not for a teacher trained here)."""
    conf = cfg.config.teacher
    if conf.trains or not conf.path or conf.source == "torchscript":
        return None
    return cfg.resolve(conf.path)


@dataclass
class TeacherBuild:
    """A built (untrained or loaded) teacher and the facts its spec records."""

    model: nn.Module
    arch: str
    kwargs: dict[str, Any]
    loaded: bool
    spec: dict[str, Any] = field(default_factory=dict)


def build_teacher(cfg: LoadedConfig, num_classes: int, input_shape: tuple[int, ...]) -> TeacherBuild:
    """The teacher model (weights loaded when a file gives them), seeded by the caller."""
    from kdpipe.ml.models.loading import load_into, load_state_dict_file
    from kdpipe.ml.models.model_fit import DataFit
    from kdpipe.ml.models.zoo import create_model

    conf = cfg.config.teacher
    arch = teacher_arch(conf, cfg.base)
    h, w = input_shape[1:]
    key = "teacher.entrypoint" if conf.source == "python" else "teacher.arch"
    try:
        model = create_model(
            arch, num_classes=num_classes, in_channels=input_shape[0], image_size=h if h == w else (h, w),
            kwargs=conf.kwargs or None,
        )  # fmt: skip
    except ConfigError:
        raise
    except UsageError as exc:
        raise ConfigError(key, str(exc), cfg.source) from None
    path = weights_path(cfg)
    if path is not None:
        state = load_state_dict_file(path, "teacher.path", conf.allow_pickle, cfg.source)
        fit = DataFit.of(cfg.config.data, input_shape, num_classes)
        load_into(model, state, "teacher.path", model_label(arch), cfg.source, fit, path.name)
    return TeacherBuild(model, arch, dict(conf.kwargs), loaded=path is not None)


def preprocessing_spec(
    cfg: LoadedConfig, model: nn.Module, loaded: bool, data_mean: list[float], data_std: list[float]
) -> dict[str, Any]:
    """Spec entries for the teacher's own preprocessing: ``input_adapter`` (or None), where its mean/std came
    from, and the input size its pretrained config names (``expected_input_size``, loaded weights only)."""
    from kdpipe.ml.models.preprocessing import adapter_spec, teacher_normalization

    out: dict[str, Any] = {"input_adapter": None, "preprocessing_source": "data", "expected_input_size": None}
    cfg_model = getattr(model, "pretrained_cfg", None)
    if loaded and isinstance(cfg_model, dict) and cfg_model.get("input_size"):
        out["expected_input_size"] = list(cfg_model["input_size"])[-2:]
    meta = None
    path = weights_path(cfg) if loaded else None
    if path is not None:
        from kdpipe.ml.models.weights import is_safetensors, read_metadata

        meta = read_metadata(path) if is_safetensors(path) else None
    found = teacher_normalization(cfg.config.teacher, model, loaded, len(data_mean), cfg.resolve, cfg.source, meta)
    if found is not None:
        mean, std, origin = found
        out.update(input_adapter=adapter_spec(data_mean, data_std, mean, std), preprocessing_source=origin)
    return out


def trained_normalization(spec: dict[str, Any], data_mean: list[float], data_std: list[float]) -> dict[str, str]:
    """safetensors metadata recording the normalisation the teacher's weights expect (what
    :func:`~kdpipe.ml.models.preprocessing.teacher_normalization` reads back when the file is loaded again)."""
    adapter = spec.get("input_adapter")
    mean, std = (adapter["mean"], adapter["std"]) if adapter else (data_mean, data_std)
    return {"kdpipe_mean": json.dumps(list(mean)), "kdpipe_std": json.dumps(list(std)), "arch": str(spec["arch"])}


def check_model_ref(name: str, base: Path) -> bool:
    """Check a ``timm:`` or ``python:`` name without building the model: the timm name exists, the user's
    function imports. Returns False for other names (the caller builds those to check them).

    Raises:
        UsageError: an unknown timm name, or an entry point that cannot be found or imported.
    """
    if name.startswith(PYTHON_PREFIX):
        from kdpipe.ml.models.entrypoints import load_callable

        load_callable(parse_entrypoint(name[len(PYTHON_PREFIX) :], base))
        return True
    from kdpipe.ml.models.zoo.timm_models import TIMM_PREFIX, check_timm_name

    if name.startswith(TIMM_PREFIX):
        check_timm_name(name[len(TIMM_PREFIX) :])
        return True
    return False


def with_teacher_data_defaults(cfg: LoadedConfig) -> LoadedConfig:
    """The config with ``data.image_size`` (and recipe imagenet's ``crop_fraction``) taken from a loaded timm
    teacher's pretrained config, where the config leaves them unset; ``cfg`` itself when nothing changes.

    Only for image-file datasets (the built-in ones have their own size) and weights loaded from a file (a
    teacher trained here learns at the data's size). Idempotent, so every entry point may apply it. Several teachers
    are fed the same images: two whose pretrained configs name different sizes are bad input (set the size).
    """
    update: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for name in cfg.teacher_names:
        for key, value in _data_defaults(cfg.for_teacher(name)).items():
            if key in update and update[key] != value:
                where = {"image_size": "data.image_size", "imagenet": "data.imagenet.crop_fraction"}[key]
                a, b = (v.crop_fraction if key == "imagenet" else v for v in (update[key], value))
                raise ConfigError(
                    where,
                    f"unset, and the teachers' pretrained configs disagree: {origin[key]} expects {a}, "
                    f"{cfg.teacher_key(name)} {b}; every teacher is fed the same images, so set {where}",
                    cfg.source,
                )
            update.setdefault(key, value)
            origin.setdefault(key, cfg.teacher_key(name))
    if not update:
        return cfg
    data = cfg.config.data
    return LoadedConfig(cfg.config.model_copy(update={"data": data.model_copy(update=update)}), cfg.path)


def _data_defaults(cfg: LoadedConfig) -> dict[str, Any]:
    """What :func:`with_teacher_data_defaults` takes from the (one) teacher of ``cfg``."""
    from kdpipe.config import FILE_DATASETS

    conf, data = cfg.config.teacher, cfg.config.data
    arch = conf.arch or ""
    if conf.source == "python" or not arch.startswith("timm:") or data.dataset not in FILE_DATASETS:
        return {}
    if weights_path(cfg) is None:
        return {}
    import timm

    pretrained = timm.models.get_pretrained_cfg(arch[len("timm:") :], allow_unregistered=True)
    if pretrained is None:
        return {}
    update: dict[str, Any] = {}
    if data.image_size is None and pretrained.input_size:
        update["image_size"] = int(pretrained.input_size[-1])
    if data.recipe == "imagenet" and "crop_fraction" not in data.imagenet.model_fields_set and pretrained.crop_pct:
        update["imagenet"] = data.imagenet.model_copy(update={"crop_fraction": float(pretrained.crop_pct)})
    return update
