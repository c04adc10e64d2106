"""validate: top-1/top-5 on the test split for teacher and student, per class, and their agreement.

With several teachers, ``teacher`` is their ensemble (the weighted mean of their logits: what the student replaces,
agreement is with it) and ``teachers`` holds each one's figures."""

from __future__ import annotations

from typing import Any

from kdpipe.stages.base import STAGES, Stage, StageContext


@STAGES.register()
class ValidateStage(Stage):
    name = "validate"
    version = 1
    needs = ("teacher", "distill")
    uses_data = True

    def run(self, ctx: StageContext) -> dict[str, Any]:
        from kdpipe.ml.runtime.device import pick_device
        from kdpipe.ml.train.training import accuracy, classification_metrics, predict
        from kdpipe.stages.distillers import load_student
        from kdpipe.stages.distillers.base import mean_logits

        data, splits = ctx.data()
        device = pick_device(ctx.cfg.config.runtime.device)
        bs = ctx.cfg.config.validate_.batch_size
        cl = ctx.cfg.config.runtime.channels_last
        _, teachers = ctx.teacher_model()
        student, _ = load_student(ctx.inputs["distill"])
        each = {
            name: predict(model.to(device), data.test_x, data.mean, data.std, bs, device, cl)
            for name, model, _ in teachers
        }
        several = len(teachers) > 1
        weights = ctx.cfg.teacher_weights
        logits = {
            "teacher": mean_logits(list(each.values()), weights) if several else each["teacher"],
            "student": predict(student.to(device), data.test_x, data.mean, data.std, bs, device, cl),
        }
        result = {name: classification_metrics(lg, data.test_y, data.classes) for name, lg in logits.items()}
        if several:  # each teacher's test figures, and the ensemble's (the teacher) top-1 on val
            result["teachers"] = {
                name: classification_metrics(lg, data.test_y, data.classes) for name, lg in each.items()
            }
            val = [predict(m.to(device), splits.val_x, data.mean, data.std, bs, device, cl) for _, m, _ in teachers]
            result["teacher"]["val_top1"] = accuracy(mean_logits(val, weights), splits.val_y)
        agreement = (logits["teacher"].argmax(1) == logits["student"].argmax(1)).float().mean().item()
        result["student"]["agreement_with_teacher"] = agreement
        result["split"] = "test"
        if data.source_report is not None:  # image datasets: in memory or streamed, and any images skipped
            result["data"] = data.source_report
        return result
