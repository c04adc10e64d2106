"""validate: top-1/top-5 on the test split for teacher and student, per class, and their agreement."""

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
        from kdpipe.ml.device import pick_device
        from kdpipe.ml.models import load_teacher
        from kdpipe.ml.training import classification_metrics, predict
        from kdpipe.stages.distillers import load_student

        data, _ = ctx.data()
        device = pick_device(ctx.cfg.config.runtime.device)
        bs = ctx.cfg.config.validate_.batch_size
        teacher, _ = load_teacher(ctx.inputs["teacher"])
        student, _ = load_student(ctx.inputs["distill"])
        logits = {
            name: predict(model.to(device), data.test_x, data.mean, data.std, bs, device)
            for name, model in (("teacher", teacher), ("student", student))
        }
        result = {name: classification_metrics(lg, data.test_y, data.classes) for name, lg in logits.items()}
        agreement = (logits["teacher"].argmax(1) == logits["student"].argmax(1)).float().mean().item()
        result["student"]["agreement_with_teacher"] = agreement
        result["split"] = "test"
        if data.source_report is not None:  # image datasets: in memory or streamed, and any images skipped
            result["data"] = data.source_report
        return result
