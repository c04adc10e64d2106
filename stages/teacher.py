"""teacher: train one from a recipe, or load a checkpoint, TorchScript file, torchvision/timm architecture or a
model built by the user's own code (``source: python``; see :mod:`kdpipe.ml.models.entrypoints`)."""

from __future__ import annotations

import shutil
import time
from typing import Any

from kdpipe.config import LoadedConfig
from kdpipe.errors import ConfigError
from kdpipe.fileio import FileDigests, atomic_write_json
from kdpipe.stages.base import STAGES, Stage, StageContext, check_model_name


@STAGES.register()
class TeacherStage(Stage):
    name = "teacher"
    version = 2
    uses_data = True
    per_teacher = True  # one instance per teacher, each keyed as a single-teacher run of it

    def config(self, cfg: LoadedConfig) -> dict[str, Any]:
        section = super().config(cfg)
        if not cfg.config.teacher.trains:  # the recipe does not shape a loaded teacher, nor which labels it trains on
            section["teacher"].pop("train")
            section["data"].pop("labels_per_class", None)
            return section
        return self.training_config(cfg, section)

    def data_parallel(self, cfg: LoadedConfig) -> bool:
        return cfg.config.teacher.trains

    def check(self, cfg: LoadedConfig) -> None:
        conf = cfg.config.teacher
        if conf.source == "python":
            check_model_name(cfg, "teacher.entrypoint", f"python:{conf.entrypoint}")
        elif conf.source != "torchscript":
            check_model_name(cfg, "teacher.arch", conf.arch or "")

    def external(self, cfg: LoadedConfig, memo: FileDigests) -> dict[str, Any]:
        """The weights file and a ``source: python`` teacher's source file: editing either rebuilds it."""
        from kdpipe.ml.models.teacher_build import teacher_code

        conf, out = cfg.config.teacher, {}
        if conf.path and not conf.trains:
            path = cfg.resolve(conf.path)
            if not path.is_file():
                raise ConfigError("teacher.path", f"file not found: {path}", cfg.source)
            out["teacher_file"] = memo.file(path)
        code = teacher_code(cfg)
        if code is not None:
            out["teacher_code"] = memo.file(code)
        return out

    def run(self, ctx: StageContext) -> dict[str, Any]:
        import torch

        from kdpipe.ml.models.entrypoints import model_label
        from kdpipe.ml.models.loading import TEACHER_SPEC, TEACHER_WEIGHTS, check_fits, count_parameters
        from kdpipe.ml.models.preprocessing import with_adapter
        from kdpipe.ml.models.teacher_build import preprocessing_spec, trained_normalization
        from kdpipe.ml.models.weights import save_weights
        from kdpipe.ml.train.training import accuracy, predict

        conf = ctx.conf
        data, splits = ctx.data()
        spec, metrics = self.describe(ctx)
        t0 = time.perf_counter()
        if conf.source == "torchscript":
            model = self.load_script(ctx)
            spec["loaded"] = True
        else:
            built = self.build(ctx)
            model = built.model
            spec.update(arch=built.arch, kwargs=built.kwargs, loaded=built.loaded, weights=TEACHER_WEIGHTS)
            metrics["arch"] = built.arch
            key = "teacher.entrypoint" if conf.source == "python" else "teacher.arch"
            # before training: the preflight cannot try it on data whose shape only the stage knows (WebDataset)
            check_fits(model, model_label(built.arch), self.fit(ctx), key, ctx.cfg.source, built.arch)
            if conf.trains:
                result = self.train(ctx, model)
                if result is None:  # a torchrun follower: rank 0 evaluates and saves
                    return {}
                metrics.update({k: v for k, v in result.items() if k != "best_state"})
            spec.update(preprocessing_spec(ctx.cfg, model, built.loaded, list(data.mean), list(data.std)))
            meta = trained_normalization(spec, list(data.mean), list(data.std))  # reloads with the right inputs
            save_weights(model.cpu(), ctx.out_dir / TEACHER_WEIGHTS, metadata=meta)
            expected = spec.get("expected_input_size")
            if expected and list(expected) != list(data.input_shape[1:]):
                ctx.log(
                    f"warning: teacher: its pretrained config says {expected[0]}x{expected[1]} inputs, the data is "
                    f"{data.input_shape[1]}x{data.input_shape[2]}; resize the data if it scores poorly"
                )
        model = with_adapter(model.cpu(), spec.get("input_adapter")).eval()
        if "best_val_top1" not in metrics:  # through the teacher's own preprocessing
            logits = predict(
                model, splits.val_x, data.mean, data.std, 512, torch.device("cpu"), ctx.cfg.config.runtime.channels_last
            )
            metrics["best_val_top1"] = accuracy(logits, splits.val_y)
        metrics["preprocessing"] = spec.get("preprocessing_source", "data")
        metrics.update(parameters=count_parameters(model), seconds=time.perf_counter() - t0)
        atomic_write_json(ctx.out_dir / TEACHER_SPEC, spec)
        return metrics

    def describe(self, ctx: StageContext) -> tuple[dict[str, Any], dict[str, Any]]:
        """The teacher's spec (what rebuilds it) and the metrics every source reports (the data it saw)."""
        from kdpipe.ml.data.memory import labeled_part

        conf = ctx.conf
        data, splits = ctx.data()
        spec = {
            "arch": conf.arch,
            "source": conf.source,
            "num_classes": data.num_classes,
            "in_channels": data.input_shape[0],
            "input_shape": list(data.input_shape),
            "classes": data.classes,
            "feature_node": conf.feature_node,
            "format": "torchscript" if conf.source == "torchscript" else "state_dict",
        }
        metrics = {
            "arch": conf.arch,
            "source": conf.source,
            "data": {
                "name": data.name,
                "classes": data.classes,
                "input_shape": list(data.input_shape),
                # a trained teacher trains on the labelled ones (data.unlabeled, data.labels_per_class)
                "train_images": len((labeled_part(splits) if conf.trains else splits).train_idx),
                "val_images": len(splits.val_idx),
                "test_images": len(data.test_y),
                **{k: v for k, v in (data.source_report or {}).items() if k == "transfer_set"},  # where train is from
            },
        }
        return spec, metrics

    def load_script(self, ctx: StageContext) -> Any:
        """A TorchScript teacher, copied into the entry as it is."""
        from kdpipe.ml.models.loading import TEACHER_SCRIPT, check_fits, load_script

        cfg = ctx.cfg
        path = cfg.resolve(ctx.conf.path or "")
        model = load_script(path, "teacher.path", cfg.source)
        shutil.copyfile(path, ctx.out_dir / TEACHER_SCRIPT)
        check_fits(model, path.name, self.fit(ctx), "teacher.path", cfg.source)
        return model

    def fit(self, ctx: StageContext) -> Any:
        """What the teacher must take and give: the data's images and classes (a ``DataFit``)."""
        from kdpipe.ml.models.model_fit import DataFit

        data, _ = ctx.data()
        return DataFit.of(ctx.cfg.config.data, tuple(data.input_shape), data.num_classes)

    def build(self, ctx: StageContext) -> Any:
        """The architecture (zoo, torchvision:, timm: or the user's entry point), initialised from the recipe's
        seed (the initialisation is part of the recipe), with the weights of ``teacher.path`` when given
        (weights_only unless ``allow_pickle``, checked against the model)."""
        import torch

        from kdpipe.ml.models.teacher_build import build_teacher

        data, _ = ctx.data()
        torch.manual_seed(ctx.conf.train.seed)
        return build_teacher(ctx.cfg, data.num_classes, tuple(data.input_shape))

    def train(self, ctx: StageContext, model: Any) -> dict[str, Any] | None:
        """Train with the teacher recipe; None on a torchrun rank other than 0."""
        from torch import nn

        from kdpipe.ml.data.memory import labeled_part
        from kdpipe.ml.runtime.device import pick_device
        from kdpipe.ml.runtime.distributed import world
        from kdpipe.ml.train.training import fit

        conf, runtime = ctx.conf, ctx.runtime
        criterion = nn.CrossEntropyLoss(label_smoothing=conf.train.label_smoothing)
        result = fit(
            model=model,
            trainable=model,
            loss_fn=lambda b: criterion(model(b.x), b.y),
            splits=labeled_part(ctx.data()[1]),  # the labelled training images (data.unlabeled's have no label)
            conf=conf.train,
            augment=ctx.cfg.config.data.augment,
            work_dir=ctx.work_dir,
            device=pick_device(runtime.device),
            desc=f"teacher {conf.arch if conf.source != 'python' else conf.entrypoint}",
            progress=ctx.progress,
            log=ctx.log,
            channels_last=runtime.channels_last,
            amp=runtime.amp,
            compile=runtime.compile,
            nproc=runtime.nproc,
        )
        return result if world()[0] == 0 else None
