"""Check before work: everything that can be checked without training is checked before the first stage runs.

An unavailable execution provider, a gate naming a model the run will not have, an unknown
``feature_node`` or a TorchScript teacher given to SimKD used to be found by the stage that needed
it, after the stages before it had trained for minutes or hours. Each check here raises the same
one-line error (key and file named, exit 2) the stage would have, before any stage runs. Checks
only look at the stages that will run (a cached stage has nothing left to fail), build untrained
models on a zero batch (shape tracing only), and never touch the data's pixels.

Top floor: the runner calls :func:`preflight` after planning and before executing.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from kdpipe.config import GateConfig, LoadedConfig
from kdpipe.diskspace import check_folder_layout, check_writable_dir, ensure_space
from kdpipe.errors import ConfigError, UsageError, describe

#: what each deployment variant needs beyond onnxruntime's core (a trimmed onnxruntime wheel may lack it)
VARIANT_MODULES = {
    "optimized": (),
    "fp16": ("onnxruntime.transformers",),
    "int8_dynamic": ("onnxruntime.quantization",),
    "int8_static": ("onnxruntime.quantization",),
}
#: (channels, height, width, classes, training images) of the datasets whose shape the config alone fixes
KNOWN_SHAPES = {
    "fashion_mnist": (1, 28, 28, 10, 60000),
    "cifar10": (3, 32, 32, 10, 50000),
    "cifar100": (3, 32, 32, 100, 50000),
}


@dataclass
class Shape:
    """What the models are built for, known from the config before any data is read."""

    channels: int
    height: int
    width: int
    classes: int
    train_images: int | None


def data_shape(cfg: LoadedConfig) -> Shape | None:
    """The input shape and class count the config implies, or None when only the data can tell."""
    data = cfg.config.data
    if data.dataset == "synthetic":
        s = data.synthetic
        return Shape(s.channels, s.image_size, s.image_size, s.num_classes, s.train_size)
    if data.dataset in KNOWN_SHAPES:
        c, h, w, k, n = KNOWN_SHAPES[data.dataset]
        return Shape(c, h, w, k, n)
    from kdpipe.ml.imagedata import image_shape  # image datasets: the file list and the first image's header

    found = image_shape(cfg)
    return Shape(*found) if found else None


def preflight(
    cfg: LoadedConfig,
    stale: Iterable[str],
    gates: Iterable[GateConfig] = (),
    complete: bool = True,
    baseline: dict[str, Any] | bool = False,
) -> None:
    """Raise the first problem the stages in ``stale`` (or the gates, when the run is ``complete``) would meet."""
    stale = set(stale)
    for key in ("cache_dir", "output_dir"):
        check_writable_dir(getattr(cfg, key), key, cfg.source)
    check_folder_layout(cfg.cache_dir, cfg.output_dir, cfg.path.parent if cfg.path else None, cfg.source)
    if complete:
        check_gates(cfg, [*cfg.config.gates, *gates], baseline)
    if "benchmark" in stale:
        check_providers(cfg)
    if "export" in stale:
        check_variants(cfg)
    if "distill" in stale:
        check_crd_memory(cfg)
    if stale & {"teacher", "features", "distill"}:
        check_models(cfg, stale)


def check_providers(cfg: LoadedConfig) -> None:
    """Every requested ONNX Runtime execution provider must be available in this onnxruntime."""
    from kdpipe.stages.benchmark import providers_to_measure

    try:
        providers_to_measure(list(cfg.config.benchmark.providers))
    except UsageError as exc:
        key, _, msg = str(exc).partition(": ")
        raise ConfigError(key, msg, cfg.source) from None


def check_variants(cfg: LoadedConfig) -> None:
    """The chosen variants' converters must be importable (a trimmed onnxruntime build may lack them)."""
    for variant in cfg.config.export.variants:
        for module in VARIANT_MODULES.get(variant, ()):
            try:
                found = importlib.util.find_spec(module) is not None
            except ModuleNotFoundError:
                found = False
            if not found:
                raise ConfigError(
                    "export.variants", f"'{variant}' needs {module}, which this onnxruntime lacks", cfg.source
                )


def run_models(cfg: LoadedConfig) -> dict[str, dict[str, Any]]:
    """The models a complete run's report will have, and what is measured of each."""
    conf = cfg.config
    teacher_exported = conf.export.teacher
    models: dict[str, dict[str, Any]] = {
        "student": {"exported": True, "agreement_with_teacher": True},
        "teacher": {"exported": teacher_exported, "agreement_with_teacher": False},
    }
    for variant in conf.export.variants:
        models[f"student-{variant}"] = {"exported": True, "agreement_with_teacher": False}
    return models


def check_gates(cfg: LoadedConfig, gates: list[GateConfig], baseline: dict[str, Any] | bool = False) -> None:
    """Each gate must name a model the run will have, a figure that will be measured for it, and a batch size
    and thread count the benchmark will measure. With a baseline report, ``baseline.models`` must be in both,
    and the baseline must have the measurement rounds the latency comparison resamples."""
    from kdpipe.reporting.gates import gate_name

    conf = cfg.config
    models = run_models(cfg)
    for g in gates:
        problem = _gate_problem(g, models, conf.benchmark.batch_sizes, conf.benchmark.intra_op_threads)
        if problem:
            raise ConfigError("gates", f"gate '{gate_name(g)}': {problem}", cfg.source)
    if baseline:
        unknown = [m for m in conf.baseline.models if m not in models]
        if unknown:
            raise ConfigError(
                "baseline.models", f"the run will have no model '{unknown[0]}'; models: {', '.join(models)}", cfg.source
            )
    if isinstance(baseline, dict):
        problem = _baseline_problem(baseline, conf.baseline, conf.benchmark.batch_sizes)
        if problem:
            raise UsageError(f"--baseline: {problem}")


def _baseline_problem(report: dict[str, Any], conf: Any, batch_sizes: list[int]) -> str | None:
    """What the baseline comparison would fail on after the run, read from the baseline report now."""
    for name in conf.models:
        old = report.get("models", {}).get(name)
        if old is None:
            return f"the baseline report has no model '{name}' (baseline.models); it has {', '.join(report['models'])}"
        if conf.max_top1_drop is not None and not isinstance((old.get("accuracy") or {}).get("top1"), int | float):
            return f"the baseline's '{name}' has no test top-1 (was its run complete?)"
        if conf.max_latency_regression_pct is None:
            continue
        for batch in batch_sizes:
            cell = (old.get("latency") or {}).get(f"batch_{batch}")
            if isinstance(cell, dict) and not cell.get("round_p50_ms"):
                return f"the baseline's '{name}' batch_{batch} has no measurement rounds (re-run its benchmark)"
    return None


def _gate_problem(
    g: GateConfig, models: dict[str, dict[str, Any]], batch_sizes: list[int], threads: list[int]
) -> str | None:
    from kdpipe.reporting.gates import LATENCY, PARITY

    model = models.get(g.model)
    if model is None:
        return f"the run will have no model '{g.model}'; models: {', '.join(models)}"
    if g.metric == "agreement_with_teacher" and not model["agreement_with_teacher"]:
        return "agreement_with_teacher is measured for the student only"
    if (g.metric in LATENCY | PARITY or g.metric == "file_bytes") and not model["exported"]:
        return f"'{g.model}' is not exported (set export.teacher: true)"
    if g.metric == "speedup_p50" and not models["teacher"]["exported"]:
        return "speedup_p50 needs the teacher benchmarked (set export.teacher: true)"
    if g.metric in LATENCY and g.batch_size not in batch_sizes:
        return f"batch size {g.batch_size} is not benchmarked; benchmark.batch_sizes is {list(batch_sizes)}"
    if g.metric in LATENCY and g.threads is not None and g.threads not in threads:
        return f"{g.threads} threads are not benchmarked; benchmark.intra_op_threads is {list(threads)}"
    return None


def check_models(cfg: LoadedConfig, stale: set[str]) -> None:
    """Build the untrained teacher and every student the run trains, cut them where the config says (a shape
    trace on a zero batch), check the method against the teacher's source, and, when the features stage runs,
    that its feature file fits on the disk. The global RNG is left as it was: the stages seed from it."""
    import torch

    with torch.random.fork_rng(devices=[]):
        _check_models(cfg, stale)


def _check_models(cfg: LoadedConfig, stale: set[str]) -> None:
    import torch

    from kdpipe.ml.entrypoints import model_label, resolve_model_name
    from kdpipe.ml.model_fit import DataFit
    from kdpipe.ml.models import check_fits, load_script
    from kdpipe.ml.split import split_model
    from kdpipe.ml.teacher_build import build_teacher, teacher_arch
    from kdpipe.ml.zoo import UnknownNameError, create_model
    from kdpipe.stages.distillers import DISTILLERS, DataInfo, TeacherParts

    conf = cfg.config
    distill = conf.distill
    methods = {m: DISTILLERS.get(m)() for m in dict.fromkeys([distill.method, *distill.compare])}
    wants_features = [d for d in methods.values() if "features" in d.signals]
    torchscript = conf.teacher.source == "torchscript"
    if "distill" in stale and wants_features and torchscript:
        d = wants_features[0]
        raise ConfigError(
            "teacher.source",
            f"{d.title} {d.why_features}, which cannot be cut out of a TorchScript file; use source: checkpoint "
            "(or torchvision) with the architecture (methods kd and scratch work with a TorchScript teacher)",
            cfg.source,
        )
    shape = data_shape(cfg)
    try:  # user code (python:) resolves against the config's folder
        teacher_name = teacher_arch(conf.teacher, cfg.base)
        student_name = resolve_model_name(distill.student, cfg.base)
    except UsageError as exc:
        key = "teacher.entrypoint" if conf.teacher.source == "python" else "distill.student"
        raise ConfigError(key, str(exc), cfg.source) from None
    teacher_key = "teacher.entrypoint" if conf.teacher.source == "python" else "teacher.arch"
    names = [] if torchscript else [("teacher", teacher_key, teacher_name, conf.teacher.kwargs)]
    if "distill" in stale:
        names.append(("student", "distill.student", student_name, distill.student_kwargs))
    fit = DataFit.of(conf.data, (shape.channels, shape.height, shape.width), shape.classes) if shape else None
    built = {}
    classes, channels = (shape.classes, shape.channels) if shape else (2, 1)
    size = (shape.height if shape.height == shape.width else (shape.height, shape.width)) if shape else None
    for role, key, name, kwargs in names:
        try:
            if role == "teacher" and fit and "teacher" in stale:  # as the stage will: weights loaded, checked
                built[role] = build_teacher(cfg, fit.classes, (fit.channels, fit.height, fit.width)).model
            else:
                built[role] = create_model(
                    name, num_classes=classes, in_channels=channels, image_size=size, kwargs=kwargs
                )
        except UnknownNameError as exc:
            raise ConfigError(key, str(exc), cfg.source) from None
        except UsageError as exc:
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(key, str(exc), cfg.source) from None
        except Exception as exc:  # the stage would fail the same way, after the stages before it
            if shape is None:
                continue  # built for placeholder classes/channels: only the name was being checked
            message = f"{model_label(name)} cannot be built for {channels}-channel images of {classes} classes"
            raise ConfigError(key, f"{message}: {describe(exc, limit=200)}", cfg.source) from None
    if shape is None or fit is None:
        return  # the feature map's shape depends on data only the stages read
    if "teacher" in stale and torchscript:
        path = cfg.resolve(conf.teacher.path or "")
        check_fits(load_script(path, "teacher.path", cfg.source), path.name, fit, "teacher.path", cfg.source)
    elif "teacher" in stale:
        check_fits(built["teacher"], model_label(teacher_name), fit, teacher_key, cfg.source, teacher_name)
    if "distill" in stale:
        check_fits(built["student"], model_label(student_name), fit, "distill.student", cfg.source, student_name)
    if torchscript:
        return
    example = torch.zeros(2, shape.channels, shape.height, shape.width)
    split = None
    if wants_features or conf.teacher.feature_node or conf.features.enabled:
        split = _cut(split_model, built["teacher"], example, conf.teacher.feature_node, "teacher.feature_node", cfg)
    if "features" in stale and conf.features.enabled and split is not None and shape.train_images:
        from kdpipe.stages.features import DISK_MARGIN, FEATURES

        images = _training_images(cfg, shape.train_images)
        itemsize = 2 if conf.features.precision == "fp16" else 4
        per_image = conf.features.views * (int(torch.Size(split.feature_shape).numel()) * itemsize + 4 * shape.classes)
        if conf.features.max_bytes is None:  # features.max_bytes is the stage's own check, once it knows the data
            ensure_space(cfg.cache_dir / "features" / FEATURES, images * per_image + DISK_MARGIN)
    if "distill" in stale:
        input_shape = (shape.channels, shape.height, shape.width)
        info = DataInfo(shape.classes, input_shape, [str(i) for i in range(shape.classes)])
        parts = TeacherParts(teacher_name, split, dict(conf.teacher.kwargs))
        for method, distiller in methods.items():
            try:
                distiller.build(parts, student_name, info, distill)
            except UsageError as exc:
                key, _, msg = str(exc).partition(": ")
                if key == "distill.student" and distill.student_feature_node and "is not a node" in msg:
                    key = "distill.student_feature_node"
                if key.startswith(("distill.", "teacher.")):
                    raise ConfigError(key, msg, cfg.source) from None
                raise ConfigError("distill.method", f"{method}: {exc}", cfg.source) from None
            except Exception as exc:  # e.g. a student whose feature map cannot be paired with the teacher's
                raise ConfigError(
                    "distill.student",
                    f"{method} cannot pair '{distill.student}' with teacher '{conf.teacher.arch}': "
                    f"{describe(exc, limit=None)}",
                    cfg.source,
                ) from None


def _cut(split_model: Any, model: Any, example: Any, node: str | None, key: str, cfg: LoadedConfig) -> Any:
    try:
        return split_model(model, example, node, what=key)
    except UsageError as exc:
        message = str(exc).removeprefix(f"{key}: ")
        raise ConfigError(key, message, cfg.source) from None


def check_crd_memory(cfg: LoadedConfig) -> None:
    """CRD draws ``distill.crd.negatives`` other training images per image from its memory: the training split
    must hold more than that. Sized from the config (and an image dataset's file list); WebDataset shards are only
    counted when the distill stage lists them, and its CRD build makes the same check."""
    distill = cfg.config.distill
    if not {"crd", "crd_kd"} & {distill.method, *distill.compare}:
        return
    shape = data_shape(cfg)
    if shape is None or not shape.train_images:
        return
    images = _training_images(cfg, shape.train_images)
    if distill.crd.negatives >= images:
        raise ConfigError(
            "distill.crd.negatives",
            f"{distill.crd.negatives} negatives per image need more training images than that; the training split "
            f"has {images} (lower distill.crd.negatives)",
            cfg.source,
        )


def _training_images(cfg: LoadedConfig, total: int) -> int:
    data = cfg.config.data
    n = total - max(1, round(total * data.val_fraction))
    return min(n, data.train_subset) if data.train_subset else n
