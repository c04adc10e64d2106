"""The training loop shared by teacher training and distillation.

One epoch checkpoint (model, optimiser, scheduler, RNG, best weights, history) is written atomically
to the stage's work dir after every epoch, so a killed run resumes from its last completed epoch and
ends with the same weights as an uninterrupted one (batches are a pure function of seed and epoch).
Model selection uses the validation split only.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdpipe.config import Augment, TrainConfig
from kdpipe.ml.data import Batch, Splits, ViewTable, normalize, steps_per_epoch, train_batches

CHECKPOINT = "epoch.pt"


def pick_device(name: str) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def make_optimizer(params: Iterable[nn.Parameter], conf: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if conf.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=conf.lr, weight_decay=conf.weight_decay)
    return torch.optim.SGD(
        params, lr=conf.lr, momentum=conf.momentum, weight_decay=conf.weight_decay, nesterov=conf.nesterov
    )


def lr_factor(conf: TrainConfig, steps: int) -> Callable[[int], float]:
    """Per-step learning-rate multiplier for the configured schedule (with optional linear warm-up)."""
    total = conf.epochs * steps
    warm = conf.warmup_epochs * steps

    def factor(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if conf.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))
        if conf.schedule == "step":
            epoch = step // steps
            return conf.gamma ** sum(epoch >= m for m in conf.milestones)
        if conf.schedule == "onecycle":
            peak = max(1, int(0.3 * total))
            if step < peak:
                return 0.1 + 0.9 * step / peak
            return 0.5 * (1 + math.cos(math.pi * (step - peak) / max(1, total - peak)))
        return 1.0

    return factor


@torch.no_grad()
def predict(
    model: nn.Module, images: torch.Tensor, mean: list[float], std: list[float], batch_size: int, device: torch.device
) -> torch.Tensor:
    """Logits (on CPU, float32) for uint8 images, in eval mode."""
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = normalize(images[start : start + batch_size].to(device), mean, std)
        out.append(model(x).float().cpu())
    return torch.cat(out) if out else torch.empty(0)


def accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int = 1) -> float:
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    return (top == labels[:, None]).any(dim=1).float().mean().item()


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> dict[str, Any]:
    """top-1, top-5, per-class top-1 and the confusion matrix (rows: true class, columns: predicted)."""
    n = len(classes)
    confusion = torch.bincount(labels * n + logits.argmax(1), minlength=n * n).view(n, n)
    support = confusion.sum(1).clamp_min(1)
    return {
        "samples": len(labels),
        "top1": accuracy(logits, labels, 1),
        "top5": accuracy(logits, labels, 5),
        "per_class_top1": {c: (confusion[i, i] / support[i]).item() for i, c in enumerate(classes)},
        "confusion": confusion.tolist(),
    }


def _save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def fit(
    *,
    model: nn.Module,
    trainable: nn.Module,
    loss_fn: Callable[[Batch], torch.Tensor],
    splits: Splits,
    conf: TrainConfig,
    augment: Augment,
    work_dir: Path,
    device: torch.device,
    desc: str,
    progress: bool = True,
    log: Callable[[str], None] = print,
    eval_batch_size: int = 512,
    channels_last: bool = False,
    views: ViewTable | None = None,
    amp: bool = False,
    compile: bool = False,
    nproc: int = 1,
) -> dict[str, Any]:
    """Train ``trainable``'s parameters to minimise ``loss_fn``; select ``model``'s epoch by val top-1.

    Args:
        model: what is evaluated on the val split each epoch (and whose best weights are kept).
        trainable: the module whose parameters are optimised (and put in train mode); part of ``model``
            or equal to it.
        loss_fn: ``batch -> loss`` for one :class:`~kdpipe.ml.data.Batch` (images and labels on ``device``).
        channels_last: move the model and every batch to channels_last memory format (faster convolutions;
            the caller converts any other module ``loss_fn`` uses).
        views: precomputed augmentation views (with cached teacher features): batches replay one of them.
        amp: autocast ``loss_fn`` (bf16 on CPU; fp16 with a gradient scaler on CUDA).
        compile: ``torch.compile`` the model in place (state_dict keys unchanged).
        nproc: data-parallel processes (gloo). Each takes ``conf.batch_size`` images of every global batch of
            ``nproc * conf.batch_size``; gradients are averaged and the learning rate is scaled by ``nproc``
            (linear scaling rule). Only this process (rank 0) evaluates, checkpoints and returns.

    Returns:
        ``{"best_state", "best_val_top1", "best_epoch", "history", "images_per_second"}``; the model is
        left holding the best weights.
    """
    from tqdm import tqdm

    from kdpipe.ml.distributed import average_buffers, average_gradients, run_data_parallel, world

    if nproc > 1:
        return run_data_parallel(
            nproc,
            work_dir,
            lambda: fit(
                model=model, trainable=trainable, loss_fn=loss_fn, splits=splits, conf=conf, augment=augment,
                work_dir=work_dir, device=device, desc=desc, progress=progress, log=log,
                eval_batch_size=eval_batch_size, channels_last=channels_last, views=views, amp=amp, compile=compile,
            ),
        )  # fmt: skip
    rank, size = world()
    steps = steps_per_epoch(splits, conf.batch_size * size)
    optimizer = make_optimizer(trainable.parameters(), conf)
    for group in optimizer.param_groups:
        group["lr"] *= size
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(conf, steps))
    state: dict[str, Any] = {"epoch": 0, "history": [], "best_val_top1": -1.0, "best_epoch": 0, "best_state": None}
    work_dir.mkdir(parents=True, exist_ok=True)
    ckpt = work_dir / CHECKPOINT
    scaler_state = None
    if ckpt.is_file():
        saved = torch.load(ckpt, map_location="cpu", weights_only=True)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        scaler_state = saved.get("scaler")
        torch.set_rng_state(saved["rng"])
        state = saved["state"]
        log(f"{desc}: resuming after epoch {state['epoch']}/{conf.epochs} from {ckpt}")
    model.to(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=fmt)
    if compile:
        model.compile()
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    scaler = torch.amp.GradScaler(device.type, enabled=amp and device.type == "cuda")
    if scaler_state:
        scaler.load_state_dict(scaler_state)
    # disable=None: tqdm draws only on a terminal, so CI logs get the per-epoch lines, not bar redraws
    bar = tqdm(
        total=conf.epochs * steps, initial=state["epoch"] * steps, desc=desc, unit="step",
        disable=None if progress and rank == 0 else True, dynamic_ncols=True, leave=False,
    )  # fmt: skip
    seen, busy = 0, 0.0
    try:
        for epoch in range(state["epoch"], conf.epochs):
            trainable.train()
            t0, total_loss, n = time.perf_counter(), 0.0, 0
            for batch in train_batches(splits, conf.batch_size * size, conf.seed, epoch, augment, views):
                if size > 1:
                    if len(batch.y) < 2 * size:  # every shard needs 2 images for BatchNorm; same on all ranks
                        continue
                    batch = batch.shard(rank, size)
                batch = batch.to(device, fmt)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
                    loss = loss_fn(batch)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if size > 1:
                    average_gradients(trainable, size)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                total_loss += loss.item() * len(batch.y)
                n += len(batch.y)
                bar.update(1)
                elapsed = busy + time.perf_counter() - t0
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.4f}", img_s=f"{(seen + n) / elapsed:.0f}")
            train_seconds = time.perf_counter() - t0
            n *= size  # images of all ranks
            busy += train_seconds
            seen += n
            if size > 1:
                average_buffers(model, size)
                if rank != 0:  # rank 0 evaluates, selects and checkpoints
                    state["epoch"] = epoch + 1
                    continue
            logits = predict(model, splits.val_x, splits.data.mean, splits.data.std, eval_batch_size, device)
            val_top1 = accuracy(logits, splits.val_y)
            record = {
                "epoch": epoch + 1,
                "train_loss": total_loss / max(1, n),
                "val_top1": val_top1,
                "lr": optimizer.param_groups[0]["lr"],
                "seconds": train_seconds,
                "images_per_second": n / train_seconds if train_seconds else 0.0,
            }
            state["history"].append(record)
            if val_top1 > state["best_val_top1"]:
                state.update(best_val_top1=val_top1, best_epoch=epoch + 1, best_state=_cpu_state(model))
            state["epoch"] = epoch + 1
            _save_atomic(
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "rng": torch.get_rng_state(),
                    "scaler": scaler.state_dict(),
                    "state": state,
                },
                ckpt,
            )
            line = (
                f"{desc} epoch {epoch + 1}/{conf.epochs}: loss {record['train_loss']:.4f}, val top-1 {val_top1:.4f}, "
                f"{record['images_per_second']:.0f} img/s"
            )
            bar.write(line) if progress else log(line)
    finally:
        bar.close()
    if rank != 0:
        return {}
    model.load_state_dict(state["best_state"])
    model.to(memory_format=torch.contiguous_format)
    done = state["history"]
    ips = sum(h["images_per_second"] * h["seconds"] for h in done) / max(1e-9, sum(h["seconds"] for h in done))
    return {
        "best_state": state["best_state"],
        "best_val_top1": state["best_val_top1"],
        "best_epoch": state["best_epoch"],
        "history": done,
        "images_per_second": ips,
    }


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
