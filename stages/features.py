"""features: the frozen teacher's feature maps and logits, computed once, as a cached artifact.

The teacher never changes during distillation, so running it at every step is wasted work. This
stage runs it once over ``features.views`` augmented views of every training image (seeded crop and
flip parameters, stored beside the features) and stores the last feature map (fp16 by default,
memory-mapped) and the logits. Distillation then samples one of the views per image per epoch and
replays its exact crop and flip on the student's input. Disabled (the default), the stage records
only that, and distillation runs the teacher online. With ``distill.data: synthetic`` it is disabled whatever
``features.enabled`` says: there is no training image to run the teacher on, and the generated ones change at
every step, so the teacher runs online on them.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from kdpipe.diskspace import ensure_space, reserve
from kdpipe.errors import ConfigError
from kdpipe.stages.base import STAGES, Stage, StageContext

FEATURES = "features.npy"
LOGITS = "logits.npy"
INDEX = "train_index.npy"
VIEWS = "views.npz"
INFO = "features.json"


@STAGES.register()
class FeaturesStage(Stage):
    name = "features"
    version = 1
    needs = ("teacher",)
    uses_data = True
    per_teacher = True  # one instance per teacher, each keyed as a single-teacher run of it

    def config(self, cfg: Any) -> dict[str, Any]:
        section = super().config(cfg)
        if not caches_features(cfg):  # nothing else matters when it is off
            return {"features": {"enabled": False}}
        section["data"].pop("labels_per_class", None)  # which images keep their labels changes no teacher output
        return section

    def check(self, cfg: Any) -> None:
        """Cached features replay crops of images held in memory: a streamed dataset runs the teacher online."""
        if not caches_features(cfg):
            return
        from kdpipe.ml.data.imagedata import will_stream

        if will_stream(cfg):
            raise ConfigError(
                "features.enabled",
                "cached teacher features need the dataset in memory, and this one streams (data.in_memory, "
                "data.recipe, data.memory_budget_mb); set features.enabled: false to run the teacher online",
                cfg.source,
            )

    def run(self, ctx: StageContext) -> dict[str, Any]:
        conf = ctx.cfg.config.features
        if not caches_features(ctx.cfg):
            if conf.enabled:
                ctx.log("features: distill.data: synthetic: no training images to cache features of; the teacher "
                        "runs online on the generated ones")  # fmt: skip
            return {"enabled": False}
        import numpy as np
        import torch
        from tqdm import tqdm

        from kdpipe.ml.data.memory import apply_params, normalize
        from kdpipe.ml.models.loading import frozen, load_teacher
        from kdpipe.ml.models.split import split_model
        from kdpipe.ml.runtime.device import pick_device

        data, splits = ctx.data()
        if not isinstance(data.train_x, torch.Tensor):
            raise ConfigError(
                "features.enabled",
                "cached teacher features need the dataset in memory, and this one streams (data.in_memory); "
                "set features.enabled: false to run the teacher online",
                ctx.cfg.source,
            )
        teacher, tspec = load_teacher(ctx.inputs["teacher"])
        device = pick_device(ctx.cfg.config.runtime.device)
        example = torch.zeros(2, *data.input_shape)
        if tspec["format"] == "torchscript":  # logits only (enough for KD)
            body, head, shape = frozen(teacher).to(device), None, None
        else:
            t = split_model(teacher, example, tspec["feature_node"], what="teacher.feature_node")
            body, head, shape = frozen(t.body).to(device), frozen(t.head).to(device), t.feature_shape
        fmt = torch.channels_last if ctx.cfg.config.runtime.channels_last else torch.contiguous_format
        body = body.to(memory_format=fmt)
        aug = ctx.cfg.config.data.augment
        if conf.views == 1 and (aug.random_crop_padding or aug.horizontal_flip):
            ctx.log(
                "warning: features.views: 1 is the plain images only: students distil on them without "
                "data.augment's crops and flips; set views > 1 or features.enabled: false to augment"
            )
        table = view_table(ctx.cfg, len(data.train_x))
        index = splits.train_idx.numpy()
        n, k = len(index), conf.views
        dtype = np.float16 if conf.precision == "fp16" else np.float32
        check_size(ctx, n, shape, np.dtype(dtype).itemsize, data.num_classes)
        feats = None
        if shape is not None:
            feats = open_reserved(ctx.out_dir / FEATURES, dtype, (n, k, *shape))
        logits = open_reserved(ctx.out_dir / LOGITS, np.float32, (n, k, data.num_classes))
        worst = 0.0
        scale = 0.0
        t0 = time.perf_counter()
        bar = tqdm(
            total=n * k, desc="teacher features", unit="img", disable=None if ctx.progress else True, leave=False
        )
        with torch.inference_mode():
            for view in range(k):
                for start in range(0, n, conf.batch_size):
                    pos = slice(start, min(n, start + conf.batch_size))
                    idx = splits.train_idx[pos]
                    x = apply_params(
                        data.train_x[idx], table.oy[idx, view], table.ox[idx, view], table.flip[idx, view],
                        ctx.cfg.config.data.augment,
                    )  # fmt: skip
                    x = normalize(x, data.mean, data.std).to(device).contiguous(memory_format=fmt)
                    if head is None:
                        out = body(x).float()
                    else:
                        f = body(x)
                        out = head(f).float()
                        f32 = f.float().cpu().numpy()
                        stored = f32.astype(dtype)
                        feats[pos, view] = stored  # type: ignore[index]
                        worst = max(worst, float(np.abs(stored.astype(np.float32) - f32).max()))
                        scale = max(scale, float(np.abs(f32).max()))
                    logits[pos, view] = out.cpu().numpy()
                    bar.update(pos.stop - pos.start)
        bar.close()
        seconds = time.perf_counter() - t0
        if feats is not None:
            feats.flush()
        logits.flush()
        np.save(ctx.out_dir / INDEX, index)
        np.savez(ctx.out_dir / VIEWS, oy=table.oy.numpy(), ox=table.ox.numpy(), flip=table.flip.numpy())
        info = {
            "enabled": True,
            "views": k,
            "images": n,
            "precision": conf.precision if feats is not None else None,
            "feature_shape": list(shape) if shape is not None else None,
            "num_classes": data.num_classes,
            "bytes": sum(p.stat().st_size for p in ctx.out_dir.iterdir()),
            "seconds": seconds,
            "images_per_second": n * k / seconds if seconds else 0.0,
            # fp16 storage error, absolute and relative to the largest activation
            "storage_max_abs_error": worst,
            "storage_max_rel_error": worst / scale if scale else 0.0,
        }
        (ctx.out_dir / INFO).write_text(json.dumps(info, indent=2))
        return info


def caches_features(cfg: Any) -> bool:
    """Whether the stage computes anything: ``features.enabled``, and the student trains on real images."""
    return cfg.config.features.enabled and cfg.config.distill.data != "synthetic"


def view_table(cfg: Any, images: int) -> Any:
    """The augmented views the teacher runs on, and distillation and QAD replay: one seeded table per config."""
    from kdpipe.ml.data.memory import make_view_table

    return make_view_table(images, cfg.config.features.views, cfg.config.data.augment, cfg.config.features.seed)


def open_reserved(path: Path, dtype: Any, shape: tuple[int, ...]) -> Any:
    """A writable ``.npy`` memory map whose blocks are allocated first: ``open_memmap`` makes a sparse file,
    and a page written into a sparse file on a full disk kills the process with SIGBUS, with no message."""
    import numpy as np

    array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    try:
        reserve(path)
    except BaseException:
        del array
        path.unlink(missing_ok=True)
        raise
    return array


def check_size(ctx: StageContext, images: int, shape: Any, itemsize: int, classes: int) -> int:
    """Stop before writing a features cache larger than ``features.max_bytes`` (default: free disk space
    minus a margin, a :class:`~kdpipe.diskspace.DiskFullError`): views × images × C×H×W × bytes, plus the logits."""
    conf = ctx.cfg.config.features
    per_view = (math.prod(shape) * itemsize if shape is not None else 0) + classes * 4
    need = conf.views * images * per_view
    if conf.max_bytes is None:  # the disk's limit: a full disk is said the way every full disk is
        ensure_space(ctx.out_dir / FEATURES, need)  # with a spare proportional to it (the run was sized before)
        return need
    limit, what = conf.max_bytes, "features.max_bytes"
    if need > limit:
        feature = "x".join(map(str, shape)) if shape is not None else "0"
        raise ConfigError(
            "features.views",
            f"the features cache would take {need / 2**30:.1f} GiB ({conf.views} views x {images} images x "
            f"({feature} x {itemsize} B + {classes} logits x 4 B)), over {what} ({max(0, limit) / 2**30:.1f} GiB); "
            "lower features.views, or set features.enabled: false to run the teacher online",
            ctx.cfg.source,
        )
    return need


class CachedTeacher:
    """Teacher signals for a :class:`~kdpipe.ml.data.memory.Batch` read from the features stage's artifact."""

    def __init__(self, folder: Path, device: Any) -> None:
        import numpy as np
        import torch

        from kdpipe.ml.data.memory import ViewTable

        self.info = json.loads((folder / INFO).read_text())
        self.index = torch.from_numpy(np.load(folder / INDEX))
        self.features = np.load(folder / FEATURES, mmap_mode="r") if (folder / FEATURES).exists() else None
        self.logits = np.load(folder / LOGITS, mmap_mode="r")
        v = np.load(folder / VIEWS)
        self.views = ViewTable(torch.from_numpy(v["oy"]), torch.from_numpy(v["ox"]), torch.from_numpy(v["flip"]))
        self.device = device

    def __call__(self, batch: Any) -> dict[str, Any]:
        import numpy as np
        import torch

        pos = torch.searchsorted(self.index, batch.index).numpy()
        view = batch.view.numpy()
        out = {"logits": torch.from_numpy(np.ascontiguousarray(self.logits[pos, view])).to(self.device)}
        if self.features is not None:
            f = torch.from_numpy(np.ascontiguousarray(self.features[pos, view])).to(self.device, torch.float32)
            if batch.x.is_contiguous(memory_format=torch.channels_last):
                f = f.contiguous(memory_format=torch.channels_last)
            out["features"] = f
        return out
