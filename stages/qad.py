"""Quantisation-aware distillation (QAD): fine-tune the distilled student under ORT-matching fake quantisation,
against the same teacher signals and loss as the method that distilled it.

A distillation pipeline has the best fine-tuning target a quantised student can get at hand: the teacher. The
student from the distill stage gets :mod:`kdpipe.exporters.qad`'s fake quantisers (BN folded, per-channel int8
weights, uint8 activations with ranges calibrated as ORT calibrates them), then trains with the shared loop
(``fit``: resumable from its work folder, epoch selected on val top-1 of the fake-quantised model) for
``export.quantization.qad.epochs``. The fine-tuned weights go back into the plain student, which the export stage
turns into fp32 ONNX and ORT quantises with the same calibration images, so the int8 kernels are ORT's own.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdpipe.config import TrainConfig
from kdpipe.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn

#: methods whose loss needs only the deployable student (FitNet's also needs its training-only regressor)
QAD_METHODS = ("simkd", "kd", "scratch")


def qad_recipe(conf: Any) -> TrainConfig:
    """The fine-tuning recipe from ``export.quantization.qad``: a short, low-lr cosine run."""
    q = conf.quantization.qad
    return TrainConfig(epochs=q.epochs, batch_size=q.batch_size, optimizer="sgd", lr=q.lr, momentum=0.9,
                       nesterov=True, weight_decay=q.weight_decay, schedule="cosine", seed=q.seed)  # fmt: skip


def check_method(method: str, source: str | None) -> None:
    if method not in QAD_METHODS:
        raise ConfigError(
            "export.variants",
            f"qad_int8 fine-tunes with the distillation loss of the deployed method, and {method}'s needs parts that "
            f"are not deployed; use distill.method {', '.join(QAD_METHODS)} or drop qad_int8",
            source,
        )


def finetune(
    ctx: Any, calibration: torch.Tensor, parity_images: torch.Tensor, work_dir: Path
) -> tuple[nn.Module, dict[str, Any], torch.Tensor]:
    """QAD-fine-tune the committed student; returns the plain student holding the fine-tuned weights, the training
    result (history, best epoch and val top-1 of the fake-quantised model) and its fake-quant logits on
    ``parity_images`` (what the exported int8 model is compared with)."""
    import torch

    from kdpipe.exporters.qad import attach, calibrate, detach, settle_dead_channels
    from kdpipe.ml.data.memory import labeled_part
    from kdpipe.ml.models.loading import load_teacher
    from kdpipe.ml.models.split import split_model
    from kdpipe.ml.runtime.device import pick_device
    from kdpipe.ml.train.training import fit
    from kdpipe.stages.distillers import DISTILLERS, Built, DataInfo, OnlineTeacher, load_student

    cfg = ctx.cfg
    conf = cfg.config.export
    data, splits = ctx.data()
    student, spec = load_student(ctx.inputs["distill"])
    method = spec.get("method", "simkd")
    check_method(method, cfg.source)
    distiller = DISTILLERS.get(method)()
    teacher, tspec = load_teacher(ctx.inputs["teacher"])
    info = DataInfo(data.num_classes, tuple(data.input_shape), list(data.classes))
    split = None
    if "features" in distiller.signals:
        split = split_model(teacher, info.example(), tspec["feature_node"], what="teacher.feature_node")
    device = pick_device(ctx.runtime.device)
    signals = OnlineTeacher(teacher, split, distiller.signals, device)
    names = attach(student, conf.quantization.per_channel)
    dead = settle_dead_channels(student)
    if dead:
        ctx.log(f"qad: {sum(dead.values())} dead channel(s) in {len(dead)} layer(s) zeroed before folding")
    calibrate(student, calibration)
    built = Built(model=student, trainable=student, spec=spec)
    views = None
    if cfg.config.features.enabled and isinstance(data.train_x, torch.Tensor):
        # the student was distilled on the features stage's precomputed views (views: 1 is the plain images
        # only): fine-tuning replays exactly those, so QAD adapts to quantisation, not to new augmentations
        from kdpipe.stages.features import view_table

        views = view_table(cfg, len(data.train_x))
    torch.manual_seed(conf.quantization.qad.seed)
    result = fit(
        model=student,
        trainable=student,
        loss_fn=lambda b: distiller.loss(built, b, signals(b)),
        splits=splits if distiller.learns_from_unlabeled() else labeled_part(splits),  # as it was distilled
        conf=qad_recipe(conf),
        augment=cfg.config.data.augment,
        work_dir=work_dir,
        device=device,
        desc=f"qad {spec['student_arch']} ({method})",
        progress=ctx.progress,
        log=ctx.log,
        keep_start=True,
        views=views,
    )
    student.cpu()
    calibrate(student, calibration)  # the ranges ORT's MinMax calibration will find on the fine-tuned weights
    with torch.no_grad():
        fake_logits = student.eval()(parity_images)
    detach(student, names)
    summary = {k: result[k] for k in ("start_val_top1", "best_val_top1", "best_epoch", "history", "images_per_second")}
    summary["dead_channels"] = dead
    summary["views"] = views.views if views is not None else None
    return student.eval(), {"method": method, "epochs": conf.quantization.qad.epochs, **summary}, fake_logits


def qad_source(ctx: Any, calibration: Any, parity_images: Any, opset: int, exporter: str) -> tuple[Path, dict, Any]:
    """Fine-tune with QAD and export the fine-tuned student to fp32 ONNX in the work folder: the source the
    ``qad_int8`` variant quantises. Returns the file, the training summary and the fake-quant logits on
    ``parity_images`` (numpy arrays in, as the export stage holds them)."""
    import torch

    from kdpipe.exporters.onnx_export import export_onnx

    images = torch.from_numpy(parity_images)
    student, summary, fake = finetune(ctx, torch.from_numpy(calibration), images, ctx.work_dir / "qad")
    path = ctx.work_dir / "qad" / "student-qad.fp32.onnx"
    export_onnx(student.float().eval(), path, images[:2].clone(), opset, exporter)
    return path, summary, fake.numpy()
