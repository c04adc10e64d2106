"""teacher: train one from a recipe, or load a checkpoint, TorchScript file or torchvision architecture."""

from __future__ import annotations

import json
import shutil
import time
from typing import Any

from kdpipe.config import LoadedConfig
from kdpipe.errors import ConfigError
from kdpipe.fileio import FileDigests
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
        from torch import nn

        from kdpipe.ml.device import pick_device
        from kdpipe.ml.distributed import world
        from kdpipe.ml.models import (
            TEACHER_SCRIPT,
            TEACHER_SPEC,
            TEACHER_STATE,
            check_classes,
            count_parameters,
            load_into,
            load_state_dict_file,
        )
        from kdpipe.ml.training import accuracy, fit, predict
        from kdpipe.ml.zoo import create_model

        cfg, conf = ctx.cfg, ctx.cfg.config.teacher
        data, splits = ctx.data()
        device = pick_device(cfg.config.runtime.device)
        spec: dict[str, Any] = {
            "arch": conf.arch,
            "source": conf.source,
            "num_classes": data.num_classes,
            "in_channels": data.input_shape[0],
            "input_shape": list(data.input_shape),
            "classes": data.classes,
            "feature_node": conf.feature_node,
            "format": "torchscript" if conf.source == "torchscript" else "state_dict",
        }
        metrics: dict[str, Any] = {
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
        t0 = time.perf_counter()
        if conf.source == "torchscript":
            path = cfg.resolve(conf.path or "")
            try:
                model = torch.jit.load(str(path), map_location="cpu")
            except Exception as exc:
                msg = f"{path.name} is not a TorchScript file ({str(exc).strip().splitlines()[0][:120]})"
                raise ConfigError("teacher.path", msg, cfg.source) from None
            shutil.copyfile(path, ctx.out_dir / TEACHER_SCRIPT)
            check_classes(model, data, "teacher.path", cfg.source)
        else:
            torch.manual_seed(conf.train.seed)  # the initialisation is part of the recipe
            model = create_model(conf.arch or "", num_classes=data.num_classes, in_channels=data.input_shape[0])
            if conf.source == "train":
                criterion = nn.CrossEntropyLoss(label_smoothing=conf.train.label_smoothing)
                result = fit(
                    model=model,
                    trainable=model,
                    loss_fn=lambda b: criterion(model(b.x), b.y),
                    splits=splits,
                    conf=conf.train,
                    augment=cfg.config.data.augment,
                    work_dir=ctx.work_dir,
                    device=device,
                    desc=f"teacher {conf.arch}",
                    progress=ctx.progress,
                    log=ctx.log,
                    channels_last=cfg.config.runtime.channels_last,
                    amp=cfg.config.runtime.amp,
                    compile=cfg.config.runtime.compile,
                    nproc=cfg.config.runtime.nproc,
                )
                if world()[0] != 0:  # a torchrun follower: rank 0 evaluates and saves
                    return {}
                metrics.update({k: v for k, v in result.items() if k != "best_state"})
            elif conf.path:
                state = load_state_dict_file(cfg.resolve(conf.path), "teacher.path", conf.allow_pickle, cfg.source)
                load_into(model, state, "teacher.path", conf.arch or "", cfg.source)
            check_classes(model, data, "teacher.arch", cfg.source)
            torch.save(model.cpu().state_dict(), ctx.out_dir / TEACHER_STATE)
        model = model.cpu().eval()
        if "best_val_top1" not in metrics:
            logits = predict(model, splits.val_x, data.mean, data.std, 512, torch.device("cpu"))
            metrics["best_val_top1"] = accuracy(logits, splits.val_y)
        metrics.update(parameters=count_parameters(model), seconds=time.perf_counter() - t0)
        (ctx.out_dir / TEACHER_SPEC).write_text(json.dumps(spec, indent=2))
        return metrics
