"""export: the deployable student (and the teacher) to ONNX with parity verified, plus re-validated variants.

With several teachers, the teacher exported (``teacher.onnx``) is their ensemble: one graph averaging their logits.

Variants (ONNX Runtime graph-optimised fp32, fp16, int8 dynamic, int8 static) are made from the fp32
student and each is re-validated on the whole test split: top-1/top-5, and agreement and max abs
difference against the fp32 student, so gates can refer to it. Every file carries metadata (classes,
input shape and layout, mean/std, kdpipe version, this stage's cache key, the architectures).
"""

from __future__ import annotations

import math
from typing import Any

import kdpipe.stages.datafree as datafree
from kdpipe.config import LoadedConfig
from kdpipe.diskspace import ensure_space, writing
from kdpipe.errors import ConfigError
from kdpipe.reporting.macs import add_macs
from kdpipe.stages.base import STAGES, Stage, StageContext
from kdpipe.version import __version__

SAMPLES = "samples.npz"


def quantization_block(variant: str, info: dict[str, Any], path: Any) -> dict[str, Any]:
    """report.json's ``quantization`` of a variant: quantised variants only (fp16 and graph optimisation quantise
    nothing), naming the final file and its size (after the metadata stamp), never the path it was built at."""
    from kdpipe.exporters.variants import VARIANTS

    dtype = VARIANTS.get(variant).quantized
    if dtype is None:
        return {}
    extra = {k: v for k, v in info.items() if k not in ("variant", "file", "bytes")}
    return {"quantization": {"dtype": dtype, **extra, "file": path.name, "bytes": path.stat().st_size}}


@STAGES.register()
class ExportStage(Stage):
    name = "export"
    # 3: samples.npz's expected logits computed as the edge runner computes them
    # 4: greedy int8_fallback; QAD keeps its start, replays distillation's views, settles dead channels
    # 5: int8_fallback also tries each node as a block with its neighbours
    # 6: every model's MACs counted here (metrics ``models.NAME.macs``), not by each report
    version = 6
    needs = ("teacher", "distill")
    after = ("validate",)  # accuracy is known before the export work starts
    uses_data = True
    libraries = ("torch", "onnx", "onnxruntime", "onnxscript")

    def check(self, cfg: LoadedConfig) -> None:
        if "qad_int8" in cfg.config.export.variants:
            from kdpipe.stages.qad import check_method

            check_method(cfg.config.distill.method, cfg.source)
            if cfg.several_teachers:
                raise ConfigError(
                    "export.variants",
                    "qad_int8 fine-tunes the student against one teacher's signals, and `teachers` lists several; "
                    "use int8_static or int8_fallback, or keep one teacher",
                    cfg.source,
                )
        datafree.check_export(cfg)

    def run(self, ctx: StageContext) -> dict[str, Any]:
        from kdpipe.ml.data.memory import normalize

        conf = ctx.conf
        data, _ = ctx.data()
        # the first test images (parity, bundle samples); the whole split is only ever read a chunk at a time
        head = normalize(data.test_x[: max(conf.parity.samples, conf.bundle_samples)], data.mean, data.std)
        out: dict[str, Any] = {"input_shape": list(data.input_shape), "models": {}}
        metadata = self.export_models(ctx, head[: conf.parity.samples], out)
        self.make_variants(ctx, head.numpy(), data.test_y.numpy(), metadata, out)
        add_macs(out["models"], ctx.out_dir)  # once, here: a cached re-run's report reads them, imports no onnx
        if conf.bundle_samples:
            self.save_samples(ctx, head.numpy(), data.test_y.numpy(), out)
        return out

    @staticmethod
    def test_logits(ctx: StageContext, path: Any) -> Any:
        """Logits of the ONNX model at ``path`` on the whole test split, normalised a chunk at a time: memory
        follows the image size, not the test split's (a streamed split is decoded again for each model)."""

        from kdpipe.exporters.variants import evaluate_onnx_chunks
        from kdpipe.ml.data.memory import normalize
        from kdpipe.ml.train.training import EVAL_PIXELS

        data, _ = ctx.data()
        chunk = max(1, min(1024, EVAL_PIXELS // math.prod(data.input_shape)))
        chunk = chunk // 256 * 256 or chunk  # keep 256-image batches where the chunk allows
        chunks = (data.test_x[i : i + chunk] for i in range(0, len(data.test_y), chunk))
        return evaluate_onnx_chunks(path, (normalize(x, data.mean, data.std).numpy() for x in chunks))

    def export_models(self, ctx: StageContext, images: Any, out: dict[str, Any]) -> dict[str, str]:
        """The fp32 student (and teacher) to ONNX, parity checked on ``images``; returns the files' metadata."""
        from kdpipe.exporters.onnx_export import export_onnx
        from kdpipe.exporters.parity import assert_parity, check_parity
        from kdpipe.ml.models.zoo import count_parameters
        from kdpipe.stages.distillers import load_student

        conf = ctx.conf
        data, _ = ctx.data()
        student, sspec = load_student(ctx.inputs["distill"])
        models = {"student": student}
        if conf.teacher:
            models["teacher"], _ = ctx.teacher_model()  # several teachers: their ensemble, as one graph
        metadata = {
            "kdpipe_version": __version__,
            "kdpipe_export_key": ctx.key,
            "classes": ",".join(data.classes),
            "input_shape": "N," + ",".join(map(str, data.input_shape)),
            "layout": "NCHW",
            "mean": ",".join(f"{v:g}" for v in data.mean),
            "std": ",".join(f"{v:g}" for v in data.std),
            "teacher_arch": str(sspec["teacher_arch"]),
            "student_arch": str(sspec["student_arch"]),
        }
        for name, model in models.items():
            path = ctx.out_dir / f"{name}.onnx"
            with writing(path, 4 * count_parameters(model) + (1 << 20)):  # fp32 weights, plus the graph
                info = export_onnx(
                    model.float().eval(),
                    path,
                    images[:2].clone(),
                    conf.opset,
                    conf.exporter,
                    {**metadata, "role": name},
                )
            info["parity"] = check_parity(model, path, images)
            assert_parity(info["parity"], conf.parity.max_abs_diff, conf.parity.min_top1_agreement, path.name)
            info["torch_parameters"] = count_parameters(model)
            out["models"][name] = info
        return metadata

    def make_variants(
        self, ctx: StageContext, head: Any, labels: Any, metadata: dict[str, str], out: dict[str, Any]
    ) -> None:
        """Each configured variant of the student, re-validated on the whole test split against the fp32 student
        (``head``: the first test images, normalised)."""
        from kdpipe.exporters.onnx_export import stamp_metadata
        from kdpipe.exporters.variants import VARIANTS, compare, evaluate_onnx, make_variant
        from kdpipe.ml.data.memory import normalize

        conf = ctx.conf
        if not conf.variants:
            return
        data, splits = ctx.data()
        reference = self.test_logits(ctx, ctx.out_dir / "student.onnx")
        q = conf.quantization
        # a data-free student (distill.data: synthetic) calibrates on its generated images: no training image is read
        generated = datafree.calibration_images(ctx.inputs["distill"], q.calibration_samples)
        images = data.train_x[splits.train_idx[: q.calibration_samples]] if generated is None else generated
        calibration = normalize(images, data.mean, data.std).numpy()
        sources, qad = {"student": ctx.out_dir / "student.onnx"}, None
        if any(VARIANTS.get(v).source == "qad" for v in conf.variants):
            from kdpipe.stages.qad import qad_source

            ctx.log("export: quantisation-aware distillation of the student")
            parity_images = head[: conf.parity.samples]
            sources["qad"], summary, fake = qad_source(ctx, calibration, parity_images, conf.opset, conf.exporter)
            qad = (summary, parity_images, fake)
        # int8_fallback's sensitivity analysis and its stopping rule see validation images only, never test
        validation = (
            normalize(splits.val_x[: q.sensitivity_samples], data.mean, data.std).numpy(),
            splits.val_y[: q.sensitivity_samples].numpy(),
        )
        for variant in conf.variants:
            name = f"student-{variant}"
            path = ctx.out_dir / f"{name}.onnx"
            kind = VARIANTS.get(variant)
            ctx.log(f"export {name}")
            ensure_space(path, (ctx.out_dir / "student.onnx").stat().st_size)  # no variant is larger than fp32
            info = make_variant(
                variant,
                sources[kind.source],
                path,
                calibration=calibration if kind.calibrated else None,
                method=q.method,
                per_channel=q.per_channel,
                ranges_path=ctx.out_dir / f"{name}.ranges.json" if kind.calibrated else None,
                validation=validation,
                accuracy_budget=q.accuracy_budget,
                max_fallback_nodes=q.max_fallback_nodes,
                fallback_candidates=q.fallback_candidates,
                work_dir=ctx.work_dir / name,
                log=ctx.log,
            )
            if kind.source == "qad" and qad:
                summary, parity_images, fake = qad
                parity = compare(evaluate_onnx(path, parity_images), fake)
                info["qad"] = {**summary, "fake_quant_parity": {"samples": len(fake), **parity}}
            stamp_metadata(path, {**metadata, "role": name, "variant": variant})
            result = compare(self.test_logits(ctx, path), reference, labels)
            out["models"][name] = {
                "file": path.name,
                "bytes": path.stat().st_size,
                "opset": conf.opset,
                "exporter": f"{conf.exporter}+{variant}",
                "variant": variant,
                "parameters": out["models"]["student"]["parameters"],  # same network; int8 weights are not floats
                "parity": {
                    "reference": "student.onnx",
                    "samples": len(labels),
                    **{k: result[k] for k in ("max_abs_diff", "mean_abs_diff", "top1_agreement")},
                },
                "accuracy": {"samples": len(labels), "top1": result["top1"], "top5": result["top5"]},
                **quantization_block(variant, info, path),
            }

    def save_samples(self, ctx: StageContext, head: Any, labels: Any, out: dict[str, Any]) -> None:
        """``samples.npz``: the first test images and every model's expected logits, for on-device checks.

        The expected logits are computed exactly as the bundle's runner computes them (its own function: the
        same batches, provider and options), so the runner reproduces them on this machine; evaluating the test
        split in other batches would make dynamic int8 quantisation, which scales by the batch, disagree."""
        import numpy as np

        from kdpipe.edge.runner import sample_outputs

        n = ctx.conf.bundle_samples
        images = np.ascontiguousarray(head[:n], dtype=np.float32)
        expected = {
            name: sample_outputs(str(ctx.out_dir / info["file"]), images) for name, info in out["models"].items()
        }
        np.savez(
            ctx.out_dir / SAMPLES, images=images, labels=labels[:n], **{f"expected_{k}": v for k, v in expected.items()}
        )
