"""export: the deployable student (and the teacher) to ONNX, checked, with parity verified on test images."""

from __future__ import annotations

from typing import Any

from pipeline import __version__
from stages.base import STAGES, Stage, StageContext


@STAGES.register("export")
class ExportStage(Stage):
    name = "export"
    version = 1
    needs = ("teacher", "distill")
    uses_data = True
    libraries = ("torch", "onnx", "onnxruntime", "onnxscript")

    def run(self, ctx: StageContext) -> dict[str, Any]:
        from exporters.onnx_export import export_onnx
        from exporters.parity import assert_parity, check_parity
        from pipeline.data import normalize
        from pipeline.models import load_teacher, stage_data
        from stages.simkd import load_student

        conf = ctx.cfg.config.export
        data, _ = stage_data(ctx)
        student, sspec = load_student(ctx.inputs["distill"])
        models = {"student": student}
        if conf.teacher:
            models["teacher"], _ = load_teacher(ctx.inputs["teacher"])
        images = normalize(data.test_x[: conf.parity.samples], data.mean, data.std)
        example = images[:2].clone()
        common = {
            "kdpipe_version": __version__,
            "classes": ",".join(data.classes),
            "input_shape": "N," + ",".join(map(str, data.input_shape)),
            "layout": "NCHW",
            "mean": ",".join(f"{v:g}" for v in data.mean),
            "std": ",".join(f"{v:g}" for v in data.std),
            "teacher_arch": str(sspec["teacher_arch"]),
            "student_arch": str(sspec["student_arch"]),
        }
        out: dict[str, Any] = {"input_shape": list(data.input_shape), "models": {}}
        for name, model in models.items():
            path = ctx.out_dir / f"{name}.onnx"
            info = export_onnx(model.float().eval(), path, example, conf.opset, conf.exporter, {**common, "role": name})
            parity = check_parity(model, path, images)
            assert_parity(parity, conf.parity.max_abs_diff, conf.parity.min_top1_agreement, path.name)
            info["parity"] = parity
            info["torch_parameters"] = sum(p.numel() for p in model.parameters())
            out["models"][name] = info
        return out
