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
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdpipe.config import FILE_DATASETS, GateConfig, LoadedConfig, stage_instance, stage_of
from kdpipe.diskspace import check_folder_layout, check_run_space, check_writable_dir, existing_ancestor
from kdpipe.errors import ConfigError, UsageError, describe

#: what each deployment variant needs beyond onnxruntime's core (a trimmed onnxruntime wheel may lack it)
VARIANT_MODULES = {
    "optimized": (),
    "fp16": ("onnxruntime.transformers",),
    "int8_dynamic": ("onnxruntime.quantization",),
    "int8_static": ("onnxruntime.quantization",),
}
#: variants built from the QAD-fine-tuned student (their ``Variant.source``): the export stage trains first
QAD_VARIANTS = {"qad_int8"}
GRAPH_BYTES = 1 << 20  # an ONNX file beyond its weights: the graph and metadata (as the export stage estimates)
REPORT_BYTES = 1 << 20  # report.json, report.md and the model card
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


@dataclass
class Sizing:
    """What the model checks built, kept for the run's disk-space estimate (:func:`check_disk_space`)."""

    #: ``teacher`` and ``student``: the models as the stages will build them (untrained, or the teacher's weights)
    models: dict[str, Any] = field(default_factory=dict)
    #: the teacher's last feature map (C, H, W), when the run cuts it
    feature_shape: tuple[int, ...] | None = None
    #: each method the distill stage trains: its :class:`~kdpipe.stages.distillers.Built` (deployed and trainable)
    students: dict[str, Any] = field(default_factory=dict)
    #: the teacher's body/head split, when the run cuts it
    split: Any = None
    #: several teachers: what was built for each (by name)
    members: dict[str, Sizing] = field(default_factory=dict)


def data_shape(cfg: LoadedConfig) -> Shape | None:
    """The input shape and class count the config implies, or None when only the data can tell."""
    data = cfg.config.data
    if data.dataset == "synthetic":
        s = data.synthetic
        return Shape(s.channels, s.image_size, s.image_size, s.num_classes, s.train_size)
    if data.dataset in KNOWN_SHAPES:
        c, h, w, k, n = KNOWN_SHAPES[data.dataset]
        return Shape(c, h, w, k, n)
    from kdpipe.ml.data.imagedata import image_shape  # image datasets: the file list and the first image's header

    found = image_shape(cfg)
    return Shape(*found) if found else None


def preflight(
    cfg: LoadedConfig,
    stale: Iterable[str],
    gates: Iterable[GateConfig] = (),
    complete: bool = True,
    baseline: dict[str, Any] | bool = False,
    entries: dict[str, Path] | None = None,
) -> None:
    """Raise the first problem the stages in ``stale`` (or the gates, when the run is ``complete``) would meet.
    ``entries``: the cache folders of the stages that are not stale (what the disk-space estimate reads sizes of)."""
    stale = set(stale)
    kinds = {stage_of(name) for name in stale}  # several teachers: teacher:NAME is a teacher stage
    sizing = Sizing()
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
        check_methods(cfg)  # several teachers: the methods that can learn from them (crd's memory is one teacher's)
        check_crd_memory(cfg)
    if kinds & _data_stages():
        check_labels(cfg)
    if cfg.several_teachers and kinds & {"teacher", "features", "distill"}:
        check_ensemble(cfg, stale, sizing)
    elif stale & {"teacher", "features", "distill"}:
        check_models(cfg, stale, sizing)
    check_disk_space(cfg, stale, sizing, entries or {})


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
    for name in cfg.teacher_names if cfg.several_teachers else ():  # each teacher, by name; `teacher`: the ensemble
        models[name] = {"exported": False, "agreement_with_teacher": False, "member": True}
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
    if (g.metric in LATENCY | PARITY or g.metric == "file_bytes") and model.get("member"):
        return f"'{g.model}' is one of the teachers, which are exported and benchmarked together, as 'teacher'"
    if (g.metric in LATENCY | PARITY or g.metric == "file_bytes") and not model["exported"]:
        return f"'{g.model}' is not exported (set export.teacher: true)"
    if g.metric == "speedup_p50" and not models["teacher"]["exported"]:
        return "speedup_p50 needs the teacher benchmarked (set export.teacher: true)"
    if g.metric in LATENCY and g.batch_size not in batch_sizes:
        return f"batch size {g.batch_size} is not benchmarked; benchmark.batch_sizes is {list(batch_sizes)}"
    if g.metric in LATENCY and g.threads is not None and g.threads not in threads:
        return f"{g.threads} threads are not benchmarked; benchmark.intra_op_threads is {list(threads)}"
    return None


def check_models(cfg: LoadedConfig, stale: set[str], sizing: Sizing | None = None) -> None:
    """Build the untrained teacher and every student the run trains, cut them where the config says (a shape
    trace on a zero batch) and check the method against the teacher's source; what was built goes into ``sizing``
    (the disk-space estimate's parameter counts). The global RNG is left as it was: the stages seed from it."""
    import torch

    with torch.random.fork_rng(devices=[]):
        _check_models(cfg, stale, Sizing() if sizing is None else sizing)


def _check_models(cfg: LoadedConfig, stale: set[str], sizing: Sizing) -> None:
    import torch

    from kdpipe.ml.models.entrypoints import model_label, resolve_model_name
    from kdpipe.ml.models.loading import check_fits, load_script, model_build_errors
    from kdpipe.ml.models.model_fit import DataFit
    from kdpipe.ml.models.split import split_model
    from kdpipe.ml.models.teacher_build import build_teacher, teacher_arch
    from kdpipe.ml.models.zoo import create_model
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
        # the stage would fail the same way, after the stages before it
        with model_build_errors(key, cfg.source, model_label(name), channels, classes, placeholder=shape is None):
            if role == "teacher" and fit and "teacher" in stale:  # as the stage will: weights loaded, checked
                built[role] = build_teacher(cfg, fit.classes, (fit.channels, fit.height, fit.width)).model
            else:
                built[role] = create_model(
                    name, num_classes=classes, in_channels=channels, image_size=size, kwargs=kwargs
                )
    sizing.models = built
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
    sizing.feature_shape = tuple(split.feature_shape) if split is not None else None
    sizing.split = split
    if "distill" in stale:
        input_shape = (shape.channels, shape.height, shape.width)
        info = DataInfo(shape.classes, input_shape, [str(i) for i in range(shape.classes)])
        parts = TeacherParts(teacher_name, split, dict(conf.teacher.kwargs))
        for method, distiller in methods.items():
            try:
                sizing.students[method] = distiller.build(parts, student_name, info, distill)
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


def check_ensemble(cfg: LoadedConfig, stale: set[str], sizing: Sizing) -> None:
    """Several teachers: each one checked as a single-teacher run of it is (:func:`check_models`; its errors name
    its own key, ``teachers.I``), then every student the run trains built for all of them (a projector or regressor
    each)."""
    import torch

    with torch.random.fork_rng(devices=[]):
        for name in cfg.teacher_names:
            view = cfg.for_teacher(name)
            own = {kind for kind in ("teacher", "features") if stage_instance(kind, name) in stale}
            own |= stale & {"distill"}
            sizing.members[name] = Sizing()
            with view.member_errors():
                _check_models(view, own, sizing.members[name])
        if "distill" in stale:
            _check_ensemble_students(cfg, sizing)


def check_methods(cfg: LoadedConfig) -> None:
    """Several teachers: every method the run trains can learn from them, on real images."""
    from kdpipe.stages.distill import check_ensemble

    check_ensemble(cfg)


def _check_ensemble_students(cfg: LoadedConfig, sizing: Sizing) -> None:
    from kdpipe.ml.models.entrypoints import resolve_model_name
    from kdpipe.ml.models.teacher_build import teacher_arch
    from kdpipe.stages.distillers import DISTILLERS, DataInfo, TeacherParts

    shape = data_shape(cfg)
    if shape is None or any(m.split is None and "teacher" in m.models for m in sizing.members.values()):
        return  # the models' shapes depend on data only the stages read (checked per teacher where they can be)
    distill = cfg.config.distill
    info = DataInfo(shape.classes, (shape.channels, shape.height, shape.width), [str(i) for i in range(shape.classes)])
    parts = []
    for name, weight in zip(cfg.teacher_names, cfg.teacher_weights, strict=True):
        teacher = cfg.for_teacher(name).config.teacher
        arch = teacher_arch(teacher, cfg.base) if teacher.source != "torchscript" else None
        parts.append(TeacherParts(arch, sizing.members[name].split, dict(teacher.kwargs), name=name, weight=weight))
    student = resolve_model_name(distill.student, cfg.base)
    for method in dict.fromkeys([distill.method, *distill.compare]):
        try:
            sizing.students[method] = DISTILLERS.get(method)().build_for(parts, student, info, distill)
        except Exception as exc:  # each teacher alone paired with the student already: what is left is the ensemble
            message = f"{method} cannot pair '{distill.student}' with the teachers: {describe(exc)}"
            raise ConfigError("distill.method", message, cfg.source) from None


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
    if not {"crd", "crd_kd"} & {distill.method, *distill.compare} or distill.data == "synthetic":
        return  # with generated images CRD is refused for its own reason (they have no lasting identity)
    images = training_split_images(cfg)
    if images is not None and distill.crd.negatives >= images:
        raise ConfigError(
            "distill.crd.negatives",
            f"{distill.crd.negatives} negatives per image need more training images than that; the training split "
            f"has {images} (lower distill.crd.negatives)",
            cfg.source,
        )


def check_labels(cfg: LoadedConfig) -> None:
    """``data.labels_per_class`` and ``data.unlabeled``, before any stage reads the data: every class has that many
    training images; the unlabelled images exist and hold images (the plan's fingerprint listed them), are no
    validation or test image of the dataset, fit the memory budget beside a dataset held in memory, and can be read
    the way the dataset is (shards beside a streamed file list cannot). A damaged image is found where the images
    are decoded, as the dataset's own are."""
    data = cfg.config.data
    if data.unlabeled is None and data.labels_per_class is None:
        return
    from kdpipe.ml.data import imagedata, unlabeled

    if data.labels_per_class is not None:
        classes, labels, rows = imagedata.training_labels(cfg)
        unlabeled.keep_labels(labels, rows, data.labels_per_class, data.seed, classes, cfg.source)
    extra = unlabeled.listing(cfg)
    if extra is None or data.dataset == "webdataset":
        return
    if data.dataset in FILE_DATASETS:
        if extra.streams_as_shards and imagedata.will_stream(cfg):
            raise ConfigError("data.unlabeled", imagedata.SHARDS_BESIDE_FILES, cfg.source)
        imagedata.check_not_held_out(cfg, extra)
        return
    shape = data_shape(cfg)
    need = len(extra) * math.prod((shape.channels, shape.height, shape.width)) if shape else 0
    if need > data.memory_budget_mb * 2**20:
        raise ConfigError(
            "data.unlabeled",
            f"{len(extra)} unlabelled images take {need / 2**20:.0f} MiB decoded at the size of {data.dataset}, "
            f"which is held in memory with them; over data.memory_budget_mb ({data.memory_budget_mb})",
            cfg.source,
        )


def check_disk_space(cfg: LoadedConfig, stale: set[str], sizing: Sizing, entries: dict[str, Path]) -> None:
    """What the stale stages will write (and the reports) must fit, with a spare, on the disks of cache_dir and
    output_dir: refused now, naming what needs the space, rather than by the stage that meets a full disk."""
    if not stale:  # an all-cached run only rewrites its reports, a few kilobytes, in place
        return
    writes = run_writes(cfg, stale, sizing, entries)
    for name in cfg.teacher_names if cfg.several_teachers else ():  # each teacher's weights, training and features
        writes += [w for w in run_writes(*_member(cfg, name, stale, sizing, entries)) if w[0] != "reports"]
    check_run_space(writes)


def _member(
    cfg: LoadedConfig, name: str, stale: set[str], sizing: Sizing, entries: dict[str, Path]
) -> tuple[LoadedConfig, set[str], Sizing, dict[str, Path]]:
    """Teacher ``name``'s share of a several-teacher run as a single-teacher run of it sees it: its config, its
    stale stages and cache entries under their stages' names, and what the checks built for it."""

    def own(name_of: str) -> bool:
        return name_of == stage_instance(stage_of(name_of), name)

    mine = {stage_of(s) for s in stale if own(s)}
    return cfg.for_teacher(name), mine, sizing.members.get(name, Sizing()), {stage_of(k): v for k, v in entries.items()
                                                                              if own(k)}  # fmt: skip


def run_writes(cfg: LoadedConfig, stale: set[str], sizing: Sizing, entries: dict[str, Path]) -> list[Any]:
    """(what, folder, bytes) of everything the run will write, from the config and the models preflight built:
    teacher features (images × views × (feature map × dtype + logits)), checkpoints (each stage's weights, and the
    largest set of epoch checkpoints one training stage keeps while it runs: weights, best weights and optimiser
    state, written beside the previous one), ONNX files (the student, each variant and the teacher), and reports."""
    conf = cfg.config
    shape = data_shape(cfg)
    teacher = _teacher_bytes(cfg, stale, sizing, entries)
    main = sizing.students.get(conf.distill.method)
    student = _state_bytes(main.model) if main is not None else _folder_bytes(entries.get("distill"))
    features = 0
    if "features" in stale and _caches_features(cfg) and shape is not None and shape.train_images:
        images, views = _training_images(cfg, shape.train_images), conf.features.views
        itemsize = 2 if conf.features.precision == "fp16" else 4
        per_view = (math.prod(sizing.feature_shape) * itemsize if sizing.feature_shape else 0) + 4 * shape.classes
        features = images * views * per_view
        if conf.features.max_bytes is not None:  # the stage writes no more than that (and refuses more)
            features = min(features, conf.features.max_bytes)
        features += 8 * images + 17 * views * shape.train_images  # the index, and the views' crops and flips
    weights, training = 0, [0]
    if "teacher" in stale and conf.teacher.source != "torchscript":  # a TorchScript teacher is read where it is
        weights += teacher
        if conf.teacher.trains and "teacher" in sizing.models:
            training.append(3 * _checkpoint_bytes(sizing.models["teacher"], conf.teacher.train))
    if "distill" in stale and sizing.students:
        weights += student
        each = [_checkpoint_bytes(built.trainable, conf.distill.train) for built in sizing.students.values()]
        training.append(2 * sum(each) + max(each))  # every method's last two, and the one being written
    onnx = 0
    if "export" in stale:
        fp32 = student + GRAPH_BYTES
        variants = list(conf.export.variants)
        onnx = fp32 * (1 + len(variants)) + (GRAPH_BYTES + teacher if conf.export.teacher else 0)
        if QAD_VARIANTS & set(variants):
            onnx += fp32  # the fine-tuned fp32 model the QAD variants are quantised from
            training.append(3 * 3 * student)  # its epoch checkpoints: weights, best weights, SGD momentum
        if shape is not None and conf.export.bundle_samples:
            models = 2 + len(variants)
            per_image = 4 * (shape.channels * shape.height * shape.width + models * shape.classes)
            onnx += conf.export.bundle_samples * per_image
    writes = [
        ("features", cfg.cache_dir, features),
        ("checkpoints", cfg.cache_dir, weights + max(training)),
        ("ONNX + variants", cfg.cache_dir, onnx),
        ("reports", cfg.output_dir, REPORT_BYTES),
    ]
    if not _same_disk(cfg.cache_dir, cfg.output_dir):  # the deliverables are copied, not linked, into output_dir
        writes += [("checkpoints", cfg.output_dir, student if "distill" in stale else 0),
                   ("ONNX + variants", cfg.output_dir, onnx)]  # fmt: skip
    return writes


def _data_stages() -> set[str]:
    from kdpipe.stages import STAGES

    return {name for name in STAGES if STAGES.get(name).uses_data}


def _caches_features(cfg: LoadedConfig) -> bool:
    """Whether the features stage stores anything (its own key says: a stage that is off records only that)."""
    from kdpipe.stages import STAGES

    return bool(STAGES.get("features")().config(cfg).get("features", {}).get("enabled"))


def _state_bytes(model: Any) -> int:
    """Bytes of a model's weights and buffers: what its saved state takes, give or take the container."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def _checkpoint_bytes(model: Any, train: Any) -> int:
    """One epoch checkpoint of ``model``: its state, the best epoch's state, and the optimiser's per-parameter
    state (AdamW: two tensors, SGD: the momentum, if any)."""
    slots = 2 if train.optimizer == "adamw" else int(train.momentum > 0)
    params = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return 2 * _state_bytes(model) + slots * params


def _teacher_bytes(cfg: LoadedConfig, stale: set[str], sizing: Sizing, entries: dict[str, Path]) -> int:
    """The teacher's weights: as built by the model checks, else its cache entry, else the file it loads (several
    teachers: all of theirs)."""
    if cfg.several_teachers:
        return sum(_teacher_bytes(*_member(cfg, name, stale, sizing, entries)) for name in cfg.teacher_names)
    if "teacher" in sizing.models:
        return _state_bytes(sizing.models["teacher"])
    if "teacher" not in stale:
        return _folder_bytes(entries.get("teacher"))
    path = cfg.resolve(cfg.config.teacher.path) if cfg.config.teacher.path else None
    return path.stat().st_size if path is not None and path.is_file() else 0


def _folder_bytes(folder: Path | None) -> int:
    if folder is None or not folder.is_dir():
        return 0
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _same_disk(a: Path, b: Path) -> bool:
    try:
        return os.stat(existing_ancestor(a)).st_dev == os.stat(existing_ancestor(b)).st_dev
    except OSError:
        return True


def training_split_images(cfg: LoadedConfig) -> int | None:
    """How many images the training split holds (``data.unlabeled``'s included), or None when only the data can
    tell (the config does not size it)."""
    shape = data_shape(cfg)
    return _training_images(cfg, shape.train_images) if shape is not None and shape.train_images else None


def _training_images(cfg: LoadedConfig, total: int) -> int:
    data = cfg.config.data
    from kdpipe.ml.data.unlabeled import listing

    n = total - max(1, round(total * data.val_fraction))
    extra = listing(cfg)  # data.unlabeled's images train too
    return (min(n, data.train_subset) if data.train_subset else n) + (len(extra) if extra is not None else 0)
