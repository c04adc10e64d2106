"""teacher: train one from a recipe, or load a checkpoint, TorchScript file or torchvision architecture."""

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
    version = 1
    uses_data = True

    def config(self, cfg: LoadedConfig) -> dict[str, Any]:
        section = super().config(cfg)
        if cfg.config.teacher.source != "train":  # the recipe does not shape a loaded teacher
            section["teacher"].pop("train")
            return section
        return self.training_config(cfg, section)

    def data_parallel(self, cfg: LoadedConfig) -> bool:
        return cfg.config.teacher.source == "train"

    def check(self, cfg: LoadedConfig) -> None:
        if cfg.config.teacher.source != "torchscript":
            check_model_name(cfg, "teacher.arch", cfg.config.teacher.arch or "")

    def external(self, cfg: LoadedConfig, memo: FileDigests) -> dict[str, Any]:
        conf = cfg.config.teacher
        if conf.path and conf.source != "train":
            path = cfg.resolve(conf.path)
            if not path.is_file():
                raise ConfigError("teacher.path", f"file not found: {path}", cfg.source)
            return {"teacher_file": memo.file(path)}
        return {}

    def run(self, ctx: StageContext) -> dict[str, Any]:
        import torch

        from kdpipe.ml.models import TEACHER_SPEC, TEACHER_STATE, check_classes, count_parameters
        from kdpipe.ml.training import accuracy, predict

        conf = ctx.conf
        data, splits = ctx.data()
        spec, metrics = self.describe(ctx)
        t0 = time.perf_counter()
        if conf.source == "torchscript":
            model = self.load_script(ctx)
        else:
            model = self.build(ctx)
            if conf.source == "train":
                result = self.train(ctx, model)
                if result is None:  # a torchrun follower: rank 0 evaluates and saves
                    return {}
                metrics.update({k: v for k, v in result.items() if k != "best_state"})
            elif conf.path:
                self.load_weights(ctx, model)
            check_classes(model, data, "teacher.arch", ctx.cfg.source)
            torch.save(model.cpu().state_dict(), ctx.out_dir / TEACHER_STATE)
        model = model.cpu().eval()
        if "best_val_top1" not in metrics:
            logits = predict(model, splits.val_x, data.mean, data.std, 512, torch.device("cpu"))
            metrics["best_val_top1"] = accuracy(logits, splits.val_y)
        metrics.update(parameters=count_parameters(model), seconds=time.perf_counter() - t0)
        atomic_write_json(ctx.out_dir / TEACHER_SPEC, spec)
        return metrics

    def describe(self, ctx: StageContext) -> tuple[dict[str, Any], dict[str, Any]]:
        """The teacher's spec (what rebuilds it) and the metrics every source reports (the data it saw)."""
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
                "train_images": len(splits.train_idx),
                "val_images": len(splits.val_idx),
                "test_images": len(data.test_y),
            },
        }
        return spec, metrics

    def load_script(self, ctx: StageContext) -> Any:
        """A TorchScript teacher, copied into the entry as it is."""
        import torch

        from kdpipe.ml.models import TEACHER_SCRIPT, check_classes

        cfg = ctx.cfg
        path = cfg.resolve(ctx.conf.path or "")
        try:
            model = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:
            msg = f"{path.name} is not a TorchScript file ({str(exc).strip().splitlines()[0][:120]})"
            raise ConfigError("teacher.path", msg, cfg.source) from None
        shutil.copyfile(path, ctx.out_dir / TEACHER_SCRIPT)
        check_classes(model, ctx.data()[0], "teacher.path", cfg.source)
        return model

    def build(self, ctx: StageContext) -> Any:
        """The architecture, initialised from the recipe's seed (the initialisation is part of the recipe)."""
        import torch

        from kdpipe.ml.zoo import create_model

        data, _ = ctx.data()
        torch.manual_seed(ctx.conf.train.seed)
        return create_model(ctx.conf.arch or "", num_classes=data.num_classes, in_channels=data.input_shape[0])

    def train(self, ctx: StageContext, model: Any) -> dict[str, Any] | None:
        """Train with the teacher recipe; None on a torchrun rank other than 0."""
        from torch import nn

        from kdpipe.ml.device import pick_device
        from kdpipe.ml.distributed import world
        from kdpipe.ml.training import fit

        conf, runtime = ctx.conf, ctx.runtime
        criterion = nn.CrossEntropyLoss(label_smoothing=conf.train.label_smoothing)
        result = fit(
            model=model,
            trainable=model,
            loss_fn=lambda b: criterion(model(b.x), b.y),
            splits=ctx.data()[1],
            conf=conf.train,
            augment=ctx.cfg.config.data.augment,
            work_dir=ctx.work_dir,
            device=pick_device(runtime.device),
            desc=f"teacher {conf.arch}",
            progress=ctx.progress,
            log=ctx.log,
            channels_last=runtime.channels_last,
            amp=runtime.amp,
            compile=runtime.compile,
            nproc=runtime.nproc,
        )
        return result if world()[0] == 0 else None

    def load_weights(self, ctx: StageContext, model: Any) -> None:
        """The checkpoint in ``teacher.path`` (weights_only unless ``allow_pickle``), checked against the model."""
        from kdpipe.ml.models import load_into, load_state_dict_file

        conf, cfg = ctx.conf, ctx.cfg
        state = load_state_dict_file(cfg.resolve(conf.path), "teacher.path", conf.allow_pickle, cfg.source)
        load_into(model, state, "teacher.path", conf.arch or "", cfg.source)
