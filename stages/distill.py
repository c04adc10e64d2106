"""distill: train the student against the frozen teacher (SimKD) and save the deployable student."""

from __future__ import annotations

import json
import time
from typing import Any

from pipeline.errors import ConfigError
from stages.base import STAGES, Stage, StageContext


@STAGES.register("distill")
class DistillStage(Stage):
    name = "distill"
    version = 1
    needs = ("teacher",)
    uses_data = True

    def run(self, ctx: StageContext) -> dict[str, Any]:
        import torch

        from pipeline.models import frozen, load_teacher, stage_data
        from pipeline.split import split_model
        from pipeline.training import fit, pick_device
        from pipeline.zoo import create_model
        from stages.simkd import STUDENT_SPEC, STUDENT_STATE, Projector, SimKDLoss, SimKDStudent, spec_shapes

        cfg, conf = ctx.cfg, ctx.cfg.config.distill
        data, splits = stage_data(ctx)
        teacher, tspec = load_teacher(ctx.inputs["teacher"])
        if tspec["format"] == "torchscript":
            raise ConfigError(
                "teacher.source",
                "SimKD reuses the teacher's classifier, which cannot be cut out of a TorchScript file; "
                "use source: checkpoint (or torchvision) with the architecture",
                cfg.source,
            )
        example = torch.zeros(2, *data.input_shape)
        t = split_model(teacher, example, tspec["feature_node"], what="teacher.feature_node")
        torch.manual_seed(conf.train.seed)
        s = split_model(
            create_model(conf.student, num_classes=data.num_classes, in_channels=data.input_shape[0]),
            example,
            conf.student_feature_node,
            what="distill.student",
        )
        spec = {
            "method": conf.method,
            "student_arch": conf.student,
            "student_feature_node": s.node,
            "teacher_arch": tspec["arch"],
            "teacher_feature_node": t.node,
            "factor": conf.factor,
            "num_classes": data.num_classes,
            "in_channels": data.input_shape[0],
            "input_shape": list(data.input_shape),
            "classes": data.classes,
            **spec_shapes(s.feature_shape, t.feature_shape),
        }
        projector = Projector(s.feature_shape[0], t.feature_shape[0], conf.factor)
        student = SimKDStudent(s.body, projector, frozen(t.head), spec["student_pool_to"])
        device = pick_device(cfg.config.runtime.device)
        criterion = SimKDLoss(frozen(t.body), spec["teacher_pool_to"]).to(device)
        if cfg.config.runtime.channels_last:
            criterion.to(memory_format=torch.channels_last)
        t0 = time.perf_counter()
        result = fit(
            model=student,
            trainable=student,
            loss_fn=lambda x, y: criterion(student, x),
            splits=splits,
            conf=conf.train,
            augment=cfg.config.data.augment,
            work_dir=ctx.work_dir,
            device=device,
            desc=f"distill {conf.student}",
            progress=ctx.progress,
            log=ctx.log,
            channels_last=cfg.config.runtime.channels_last,
        )
        torch.save(student.cpu().state_dict(), ctx.out_dir / STUDENT_STATE)
        (ctx.out_dir / STUDENT_SPEC).write_text(json.dumps(spec, indent=2))
        return {
            "method": conf.method,
            "student_arch": conf.student,
            "teacher_arch": tspec["arch"],
            "parameters": student.parameter_breakdown(),
            "feature_nodes": {"student": s.node, "teacher": t.node},
            "seconds": time.perf_counter() - t0,
            **{k: v for k, v in result.items() if k != "best_state"},
        }
