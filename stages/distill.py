"""distill: train the student against the frozen teacher and save the deployable student.

The method (``distill.method``: one file each in ``stages/distillers/``) builds the
student and its loss; this stage feeds it the teacher signals it asks for per batch and trains it with
the shared loop (resume from the work dir, selection on val). The signals come from the features stage's
cache when ``features.enabled`` (every method then trains on its precomputed augmented views), otherwise
from the teacher run online on each batch. ``distill.compare`` trains further methods
with the same student, recipe and seed, each in its own work folder, and reports them all side by side
(val top-1 selects the epoch, test top-1 is for reporting only); only ``distill.method``'s student is saved.
With ``distill.data: synthetic`` the training batches come from a generator trained against the frozen teacher
(``stages/datafree.py``): no training image is read, and the generator and its last images join the entry.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import kdpipe.stages.datafree as datafree
from kdpipe.config import LoadedConfig, SimKDConfig
from kdpipe.errors import ConfigError, UsageError
from kdpipe.fileio import FileDigests
from kdpipe.stages.base import STAGES, Stage, StageContext, check_model_name, read_metrics

if TYPE_CHECKING:
    import torch
    from torch import nn

    from kdpipe.ml.data.memory import Batch, Splits
    from kdpipe.stages.distillers import Built, DataInfo, Distiller, TeacherParts


@STAGES.register()
class DistillStage(Stage):
    name = "distill"
    version = 2
    needs = ("teacher", "features")
    uses_data = True

    def config(self, cfg: LoadedConfig) -> dict[str, Any]:
        """The distill section without the settings of methods that are not trained (they change nothing)."""
        section = super().config(cfg)
        conf = section["distill"]
        used = {conf["method"], *conf["compare"]}
        for method, key in (("kd", "kd"), ("fitnet", "fitnet"), ("simkd", "factor"), ("simkd", "simkd")):
            if method not in used:
                conf.pop(key, None)
        if conf.get("simkd") == SimKDConfig().model_dump(mode="json"):
            conf.pop("simkd")  # the paper's loss: keys of runs from before the section existed stay valid
        for key, readers in (("crd", {"crd", "crd_kd"}), ("dkd", {"dkd"}), ("zipf", {"zipf_ls"})):
            if not used & readers:
                conf.pop(key, None)
        if conf.get("data", "real") == "real":  # real images: the key stays what it was before data-free existed
            conf.pop("data", None)
            conf.pop("datafree", None)
        return self.training_config(cfg, section)

    def check(self, cfg: LoadedConfig) -> None:
        check_model_name(cfg, "distill.student", cfg.config.distill.student)
        check_ensemble(cfg)  # several teachers: before the data-free checks, which read the one teacher
        datafree.check(cfg)
        check_warmup(cfg)

    def data_parallel(self, cfg: LoadedConfig) -> bool:
        return True

    def external(self, cfg: LoadedConfig, memo: FileDigests) -> dict[str, Any]:
        """A ``python:`` student's source file: editing the user's code rebuilds the student."""
        from kdpipe.ml.models.entrypoints import PYTHON_PREFIX, parse_entrypoint, source_file

        student = cfg.config.distill.student
        if not student.startswith(PYTHON_PREFIX):
            return {}
        try:
            path = source_file(parse_entrypoint(student[len(PYTHON_PREFIX) :], cfg.base))
        except UsageError as exc:
            raise ConfigError("distill.student", str(exc), cfg.source) from None
        return {"student_code": memo.file(path)}

    def run(self, ctx: StageContext) -> dict[str, Any]:
        import torch

        from kdpipe.ml.models.loading import count_parameters
        from kdpipe.ml.runtime.device import pick_device
        from kdpipe.ml.runtime.distributed import world
        from kdpipe.ml.train.training import accuracy, predict
        from kdpipe.stages.distillers import DISTILLERS, STUDENT_SPEC, STUDENT_STATE, DataInfo

        cfg, conf = ctx.cfg, ctx.cfg.config.distill
        data, splits = ctx.data()
        methods = {m: DISTILLERS.get(m)() for m in dict.fromkeys([conf.method, *conf.compare])}
        info = DataInfo(data.num_classes, tuple(data.input_shape), list(data.classes), splits.train_idx)
        check_student_fits(ctx, tuple(data.input_shape), data.num_classes)
        teachers, parts = teacher_parts(ctx, list(methods.values()), info)
        tspec = teachers[0][2]
        device = pick_device(cfg.config.runtime.device)
        if conf.data == "synthetic":
            datafree.require_validation(cfg, len(splits.val_idx))
        teacher_size = min(count_parameters(model) for _, model, _ in teachers)  # with several: the smallest
        channels_last = cfg.config.runtime.channels_last

        metrics: dict[str, Any] = {}
        rows: list[dict[str, Any]] = []
        for method, distiller in methods.items():
            main = method == conf.method
            work_dir = ctx.work_dir if main else ctx.work_dir / method
            check = (lambda b, d=distiller: check_size(ctx, d, b, teacher_size)) if main else None
            models = [model for _, model, _ in teachers]
            built, result = train_method(ctx, distiller, parts, models, info, splits, device, work_dir, check)
            source = result.pop("source", None)
            if world()[0] != 0:  # a torchrun follower: rank 0 evaluates, compares and saves
                continue
            breakdown = distiller.parameter_breakdown(built)
            if conf.compare:
                logits = predict(built.model.to(device), data.test_x, data.mean, data.std, 512, device, channels_last)
                row = {
                    "method": method,
                    "deployed": main,
                    "uses_teacher": bool(distiller.signals),
                    "val_top1": result["best_val_top1"],
                    "test_top1": accuracy(logits, data.test_y),
                    "delta_vs_scratch": None,
                    "seconds": sum(h["seconds"] for h in result["history"]),  # epochs' training time, resume-proof
                    "parameters": breakdown["total"],
                    "images_per_second": result["images_per_second"],
                }
                rows.append(row)
                ctx.log(f"distill {method}: val top-1 {row['val_top1']:.4f}, test top-1 {row['test_top1']:.4f}")
            if main:
                torch.save(built.model.cpu().state_dict(), ctx.out_dir / STUDENT_STATE)
                (ctx.out_dir / STUDENT_SPEC).write_text(json.dumps(built.spec, indent=2))
                metrics = {
                    "method": method,
                    "student_arch": built.spec["student_arch"],
                    "teacher_parameters": teacher_size,
                    "feature_modes": {
                        "student": built.spec.get("student_split_mode"),
                        "teacher": built.spec.get("teacher_split_mode"),
                    },
                    "teacher_arch": tspec["arch"] if len(teachers) == 1 else built.spec["teacher_arch"],
                    **({"teachers": built.spec["teachers"]} if len(teachers) > 1 else {}),
                    "parameters": breakdown,
                    "feature_nodes": {
                        "student": built.spec.get("student_feature_node"),
                        "teacher": built.spec.get("teacher_feature_node"),
                    },
                    **{k: v for k, v in result.items() if k != "best_state"},
                }
                if data.source_report is not None:  # image datasets: which path, images skipped while training
                    metrics["data"] = data.source_report
                real = len(splits.train_idx)
                unlabeled = int((data.train_y[splits.train_idx] < 0).sum())
                if unlabeled:  # data.unlabeled / data.labels_per_class: how many training images had a label
                    metrics["labels"] = {"labeled_images": real - unlabeled, "unlabeled_images": unlabeled}
                metrics["training_data"] = datafree.training_data(ctx.out_dir, source, result["history"], real)
            del built, result
        scratch = next((r for r in rows if r["method"] == "scratch"), None)
        for row in rows if scratch else ():
            row["delta_vs_scratch"] = row["test_top1"] - scratch["test_top1"]
        return {**metrics, "comparison": rows}


def teacher_parts(
    ctx: StageContext, methods: list[Distiller], info: DataInfo
) -> tuple[list[tuple[str, nn.Module, dict[str, Any]]], list[TeacherParts]]:
    """Every teacher (name, model, spec), each checked (a loaded one must beat chance), and its parts as the methods
    see them: cut into body and head when one of them needs feature maps, with its name and normalised weight."""
    from kdpipe.ml.models.split import split_model
    from kdpipe.stages.distillers import TeacherParts

    cfg = ctx.cfg
    _, teachers = ctx.teacher_model()
    need_features = [d for d in methods if "features" in d.signals]
    parts = []
    for (name, teacher, tspec), weight in zip(teachers, cfg.teacher_weights, strict=True):
        key = cfg.teacher_key(name)
        split = None
        if need_features:
            if tspec["format"] == "torchscript":
                raise ConfigError(
                    f"{key}.source",
                    f"{need_features[0].title} {need_features[0].why_features}, which cannot be cut out of a "
                    "TorchScript file; use source: checkpoint (or torchvision) with the architecture "
                    "(methods kd and scratch work with a TorchScript teacher)",
                    cfg.source,
                )
            split = split_model(teacher, info.example(), tspec["feature_node"], what=f"{key}.feature_node")
        parts.append(TeacherParts(tspec["arch"], split, dict(tspec.get("kwargs") or {}), name=name, weight=weight))
        check_loaded_teacher(ctx, tspec, name)
    return teachers, parts


def train_method(
    ctx: StageContext,
    distiller: Distiller,
    parts: list[TeacherParts],
    teachers: list[nn.Module],
    info: DataInfo,
    splits: Splits,
    device: torch.device,
    work_dir: Path,
    check: Callable[[Built], None] | None = None,
) -> tuple[Built, dict[str, Any]]:
    """Build ``distiller``'s student (seeded) for the teachers (``parts``, ``teachers``: one, or several), ``check``
    it, and train it with the shared loop; the result adds ``seconds`` (and, with ``distill.data: synthetic``, the
    generator's batch ``source``)."""
    import torch

    from kdpipe.ml.data.memory import labeled_part
    from kdpipe.ml.models.entrypoints import resolve_model_name
    from kdpipe.ml.train.training import fit

    cfg, conf = ctx.cfg, ctx.cfg.config.distill
    channels_last = cfg.config.runtime.channels_last
    torch.manual_seed(conf.train.seed)  # every method starts from the same student initialisation
    built = distiller.build_for(parts, resolve_model_name(conf.student, cfg.base), info, conf)
    if check is not None:
        check(built)
    source = None
    if conf.data == "synthetic":  # batches from a generator trained against the teacher, never a training image
        source = datafree.make_source(ctx, teachers[0], built.model, device, distiller.signals)  # one teacher
    teacher_signals, views = signals_of(ctx, distiller, parts, teachers, device, cached=source is None)
    if source is not None and source.stored:  # the teacher's logits stored with each generated image
        teacher_signals = source.teacher_signals
    t0 = time.perf_counter()
    result = fit(
        model=built.trainable,
        trainable=built.trainable,
        loss_fn=lambda b: distiller.loss(built, b, teacher_signals(b)),
        splits=splits if distiller.learns_from_unlabeled() else labeled_part(splits),  # no teacher: labels only
        conf=conf.train,
        augment=cfg.config.data.augment,
        work_dir=work_dir,
        device=device,
        desc=f"distill {conf.student} ({distiller.name})",
        progress=ctx.progress,
        log=ctx.log,
        channels_last=channels_last,
        views=views,
        amp=cfg.config.runtime.amp,
        compile=cfg.config.runtime.compile,
        nproc=cfg.config.runtime.nproc,
        source=source,
    )
    if source is None:
        return built, {**result, "seconds": time.perf_counter() - t0}
    source.close()
    return built, {**result, "seconds": time.perf_counter() - t0, "source": source}


def signals_of(
    ctx: StageContext,
    distiller: Distiller,
    parts: list[TeacherParts],
    teachers: list[nn.Module],
    device: torch.device,
    cached: bool = True,
) -> tuple[Callable[[Batch], dict[str, Any]], Any]:
    """What the method asks of the teachers per batch, and the views it trains on (None: fresh augmentation).

    From the features stage's cache when it is enabled (``cached``; every method, even scratch, then trains on the
    same precomputed views), else from each teacher run on the batch; several teachers' signals are combined as the
    method takes them (:class:`~kdpipe.stages.distillers.base.EnsembleSignals`)."""
    from kdpipe.stages.distillers import OnlineTeacher
    from kdpipe.stages.distillers.base import EnsembleSignals

    channels_last = ctx.cfg.config.runtime.channels_last
    try:
        folders = [folder for _, folder in ctx.teachers("features")] if cached else []
    except KeyError:  # a context without the features stage's entries
        folders = []
    sources: list[Any] = []
    views = None
    if folders and all(read_metrics(folder).get("enabled") for folder in folders):
        from kdpipe.stages.features import CachedTeacher

        sources = [CachedTeacher(folder, device) for folder in folders]
        views = sources[0].views  # the same table for every teacher: one features config, one seed
        sources = sources if distiller.signals else []
    if not sources:
        pairs = zip(teachers, parts, strict=True)
        sources = [OnlineTeacher(t, p.split, distiller.signals, device, channels_last) for t, p in pairs]
    if len(sources) == 1:
        return sources[0], views
    return EnsembleSignals(sources, [p.weight for p in parts], distiller.ensemble_mode()), views


def check_student_fits(ctx: StageContext, input_shape: tuple[int, ...], classes: int) -> None:
    """The student must take the data's images and give one logit per class, else one line (exit 2) before any
    training. The preflight tries this when the config tells the data's shape; where only the data does (WebDataset
    shards), this is the first chance, as the teacher stage's is for the teacher."""
    from kdpipe.ml.models.entrypoints import model_label, resolve_model_name
    from kdpipe.ml.models.loading import check_fits, model_build_errors
    from kdpipe.ml.models.model_fit import DataFit
    from kdpipe.ml.models.zoo import create_model

    cfg, conf = ctx.cfg, ctx.cfg.config.distill
    fit = DataFit.of(cfg.config.data, input_shape, classes)
    with model_build_errors("distill.student", cfg.source, model_label(conf.student), fit.channels, classes):
        name = resolve_model_name(conf.student, cfg.base)
        size = fit.height if fit.height == fit.width else (fit.height, fit.width)
        model = create_model(
            name, num_classes=classes, in_channels=fit.channels, image_size=size, kwargs=conf.student_kwargs
        )
    check_fits(model, model_label(name), fit, "distill.student", cfg.source, name)


def check_loaded_teacher(ctx: StageContext, tspec: dict[str, Any], name: str = "teacher") -> None:
    """A teacher loaded from a file must beat chance on val before anything is distilled from it."""
    from kdpipe.ml.models.teacher_checks import check_teacher_accuracy

    cfg = ctx.cfg
    loaded = tspec.get("loaded", tspec.get("source") in ("checkpoint", "torchscript"))
    if not (loaded and cfg.for_teacher(name).config.teacher.check_accuracy):
        return
    tm = read_metrics(dict(ctx.teachers())[name])
    if tm.get("best_val_top1") is None:
        return
    adapter = tspec.get("input_adapter")
    fed = (
        f"mean {adapter['mean']} std {adapter['std']} ({tspec.get('preprocessing_source', 'teacher')})"
        if adapter
        else "the data's own mean/std"
    )
    what = f"{tspec.get('source')} {tspec.get('arch') or ''}".strip()
    n_val = tm.get("data", {}).get("val_images", 0)
    with cfg.for_teacher(name).member_errors():  # several teachers: the error names this one's key
        check_teacher_accuracy(tm["best_val_top1"], len(tspec["classes"]), n_val, what, fed, cfg.source)


def check_size(ctx: StageContext, distiller: Distiller, built: Built, teacher_size: int) -> None:
    """Before training: warn (or, with ``distill.require_smaller``, fail) when the deployable student is not
    smaller than the teacher (with several teachers: the smallest), naming the SimKD projector factor that would
    fit."""
    from kdpipe.ml.models.teacher_checks import size_verdict, smallest_fitting_factor

    conf = ctx.cfg.config.distill
    breakdown = distiller.parameter_breakdown(built)
    if breakdown["total"] < teacher_size:
        return
    factor = fit = None
    projector = getattr(built.model, "projector", None)
    if distiller.name == "simkd" and projector is not None:
        from kdpipe.stages.distillers.simkd import projector_size

        spec = built.spec
        t_c = max(f["teacher_feature_shape"][0] for f in spec.get("teachers") or [spec])
        factor = conf.factor
        fixed = breakdown["total"] - breakdown["projector"]
        fit = smallest_fitting_factor(fixed, teacher_size, lambda f: projector_size(spec, f), t_c, factor + 1)
    whose = "the smallest teacher's" if ctx.cfg.several_teachers else "the teacher's"
    message = size_verdict(breakdown, teacher_size, fit, factor, whose)
    if message is None:
        return
    if conf.require_smaller:
        raise ConfigError("distill.require_smaller", message, ctx.cfg.source)
    ctx.log(f"warning: distill.student: {message}")


def check_warmup(cfg: LoadedConfig) -> None:
    """DKD's warm-up must end within the run: longer, its distillation terms never reach their weight."""
    conf = cfg.config.distill
    if "dkd" in (conf.method, *conf.compare) and conf.dkd.warmup_epochs(conf.train.epochs) > conf.train.epochs:
        raise ConfigError(
            "distill.dkd.warmup",
            f"{conf.dkd.warmup} warm-up epochs, but distill.train.epochs is {conf.train.epochs}: the distillation "
            "terms would never reach full weight; set dkd.warmup <= the epochs (the paper: 20 of 240)",
            cfg.source,
        )


def check_ensemble(cfg: LoadedConfig) -> None:
    """Several teachers: every method trained must learn from several (:meth:`Distiller.ensemble_mode`), and the
    student must train on real images (a data-free generator is trained against one teacher)."""
    if not cfg.several_teachers:
        return
    from kdpipe.stages.distillers import DISTILLERS
    from kdpipe.stages.distillers.base import ENSEMBLE_REFUSAL

    conf = cfg.config.distill
    if conf.data == "synthetic":
        raise ConfigError(
            "distill.data",
            "synthetic trains a generator against one teacher, and `teachers` lists several; use real data or keep "
            "one teacher",
            cfg.source,
        )
    for key, method in [("distill.method", conf.method), *(("distill.compare", m) for m in conf.compare)]:
        if DISTILLERS.get(method).ensemble_mode() == "none":
            raise ConfigError(key, f"{method} {ENSEMBLE_REFUSAL}", cfg.source)
