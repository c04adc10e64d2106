"""The training loop shared by teacher training and distillation.

One epoch checkpoint (model, optimiser, scheduler, RNG, best weights, history) is written atomically
to the stage's work dir after every epoch, so a killed run resumes from its last completed epoch and
ends with the same weights as an uninterrupted one (batches are a pure function of seed and epoch).
Model selection uses the validation split only.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from kdpipe.config import Augment, TrainConfig
from kdpipe.diskspace import writing
from kdpipe.errors import describe
from kdpipe.fileio import atomic_path, atomic_write_text, sha256_file
from kdpipe.ml.data.memory import Batch, Splits, ViewTable, normalize, steps_per_epoch, train_batches

CHECKPOINT = "epoch.pt"
PREVIOUS = "epoch.prev.pt"  # the checkpoint before the last: kept until the next one is complete
log = logging.getLogger("kdpipe")
EVAL_PIXELS = 1 << 24  # values per evaluation batch (64 MB of float32 input)


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
        return 1.0

    return factor


def make_scheduler(
    optimizer: torch.optim.Optimizer, conf: TrainConfig, steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """The per-step scheduler of ``conf.schedule``. onecycle is PyTorch's OneCycleLR (cosine up from
    lr / div_factor over pct_start of the steps, cosine down to ~0, optionally cycling momentum) peaking at the
    optimiser's lr as set (already scaled by the world size); the others are :func:`lr_factor` multipliers."""
    if conf.schedule != "onecycle":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(conf, steps))
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=[group["lr"] for group in optimizer.param_groups],
        total_steps=max(2, conf.epochs * steps),
        pct_start=conf.pct_start,
        div_factor=conf.div_factor,
        cycle_momentum=conf.cycle_momentum,
        base_momentum=conf.base_momentum,
        max_momentum=conf.momentum,
    )


@torch.no_grad()
def predict(
    model: nn.Module,
    images: torch.Tensor,
    mean: list[float],
    std: list[float],
    batch_size: int,
    device: torch.device,
    channels_last: bool = False,
) -> torch.Tensor:
    """Logits (on CPU, float32) for uint8 images (a tensor or a streamed image sequence), in eval mode.

    Batches hold at most :data:`EVAL_PIXELS` values, so 224-px images are evaluated ~110 at a time whatever
    ``batch_size`` says: memory depends on the image size, never on how many images there are. ``channels_last``
    (``runtime.channels_last``): convolutions in that memory format (1.4x faster for wrn_16_2 on this project's
    CPUs); the model is handed back in its own format."""
    model.eval()
    out = []
    batch_size = max(1, min(batch_size, EVAL_PIXELS // max(1, math.prod(images.shape[1:]))))
    fmt = torch.channels_last if channels_last and len(images.shape) == 4 else None
    convert = fmt is not None and not _is_channels_last(model)
    if convert:
        model.to(memory_format=fmt)
    try:
        for start in range(0, len(images), batch_size):
            x = normalize(images[start : start + batch_size].to(device), mean, std)
            out.append(model(x if fmt is None else x.contiguous(memory_format=fmt)).float().cpu())
    finally:
        if convert:
            model.to(memory_format=torch.contiguous_format)
    return torch.cat(out) if out else torch.empty(0)


def _is_channels_last(model: nn.Module) -> bool:
    """Whether the model's convolution weights are already in channels_last format (a model being trained in it)."""
    weight = next((p for p in model.parameters() if p.dim() == 4 and p.shape[1] > 1 and p.shape[2:].numel() > 1), None)
    return weight is not None and weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()


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


def _tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor in a nested checkpoint object: what ``torch.save`` will write, give or take."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _save_atomic(obj: Any, path: Path) -> None:
    """Write a checkpoint beside the previous one and keep that one (``epoch.prev.pt``) until the new one is
    complete: a checkpoint damaged later still leaves a good one to resume from. The space is checked first."""
    needs = _tensor_bytes(obj) + (1 << 16)
    previous = path.with_name(PREVIOUS)
    with writing(path, needs):
        with atomic_path(path) as tmp:
            torch.save(obj, tmp)
            digest = sha256_file(tmp)
            if path.exists():  # the digest first: a kill between the renames leaves the newest checkpoint usable
                if _digest_file(path).exists():
                    os.replace(_digest_file(path), _digest_file(previous))
                os.replace(path, previous)
        atomic_write_text(_digest_file(path), digest)


def _digest_file(path: Path) -> Path:
    """The sha256 written beside a checkpoint: torch.load does not notice bytes damaged inside a tensor."""
    return path.with_name(path.name + ".sha256")


def _load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint's contents, checked for the shape :meth:`_Loop.resume` needs (anything else raises)."""
    digest = _digest_file(path)
    if digest.is_file() and digest.read_text().strip() != sha256_file(path):
        raise ValueError("its bytes do not match the sha256 written with it")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(saved, dict) or not all(k in saved for k in ("model", "optimizer", "scheduler", "rng", "state")):
        raise ValueError("not an epoch checkpoint of this kdpipe")
    state = saved["state"]
    if (
        not isinstance(state, dict)
        or not isinstance(state.get("epoch"), int)
        or not isinstance(state.get("history"), list)
    ):
        raise ValueError("its training state is damaged")
    return saved


class BatchSource(Protocol):
    """Where training batches come from instead of the training split (data-free distillation's generator,
    :class:`~kdpipe.ml.train.datafree.SyntheticSource`): ``steps`` batches an epoch, a pure function of the epoch and of
    :meth:`state_dict`, which is checkpointed with the model so a killed run resumes to the same result."""

    steps: int

    def batches(self, epoch: int) -> Iterator[Batch]: ...

    def epoch_record(self) -> dict[str, Any]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class FitJob:
    """One training run: what is trained, on what, how, and where its checkpoints go.

    Attributes:
        model: what is evaluated on the val split each epoch (and whose best weights are kept).
        trainable: the module whose parameters are optimised (and put in train mode); part of ``model``
            or equal to it.
        loss_fn: ``batch -> loss`` for one :class:`~kdpipe.ml.data.memory.Batch` (images and labels on ``device``).
        channels_last: move the model and every batch to channels_last memory format (faster convolutions;
            the caller converts any other module ``loss_fn`` uses).
        views: precomputed augmentation views (with cached teacher features): batches replay one of them.
        amp: autocast ``loss_fn`` (bf16 on CPU; fp16 with a gradient scaler on CUDA).
        compile: ``torch.compile`` the model in place (state_dict keys unchanged).
        keep_start: evaluate the model before training as "epoch 0": when no epoch beats it on val top-1, the
            starting weights are what comes back (fine-tuning never ships worse than where it started).
        source: training batches from this :class:`BatchSource` instead of ``splits``' training split (val still
            selects the epoch); its state is checkpointed and its ``epoch_record`` joins each epoch's history.
    """

    model: nn.Module
    trainable: nn.Module
    loss_fn: Callable[[Batch], torch.Tensor]
    splits: Splits
    conf: TrainConfig
    augment: Augment
    work_dir: Path
    device: torch.device
    desc: str
    progress: bool = True
    log: Callable[[str], None] = print
    eval_batch_size: int = 512
    channels_last: bool = False
    views: ViewTable | None = None
    amp: bool = False
    compile: bool = False
    keep_start: bool = False
    source: BatchSource | None = None


def fit(*, nproc: int = 1, **job: Any) -> dict[str, Any]:
    """Train ``trainable``'s parameters to minimise ``loss_fn``; select ``model``'s epoch by val top-1.

    Args:
        nproc: data-parallel processes (gloo). Each takes ``conf.batch_size`` images of every global batch of
            ``nproc * conf.batch_size``; gradients are averaged and the learning rate is scaled by ``nproc``
            (linear scaling rule). Only this process (rank 0) evaluates, checkpoints and returns.
        **job: the fields of :class:`FitJob`.

    Returns:
        ``{"best_state", "best_val_top1", "best_epoch", "history", "images_per_second"}``; the model is
        left holding the best weights.
    """
    spec = FitJob(**job)
    if nproc > 1 and spec.source is not None:
        raise ValueError("a batch source trains in one process (nproc 1)")
    if nproc > 1:
        from kdpipe.ml.runtime.distributed import run_data_parallel

        return run_data_parallel(nproc, spec.work_dir, lambda: _Loop(spec).run())
    return _Loop(spec).run()


class _Loop:
    """The epoch loop of one process: resume, train an epoch, evaluate and checkpoint, return the best."""

    def __init__(self, job: FitJob) -> None:
        from kdpipe.ml.runtime.distributed import world

        self.job = job
        self.rank, self.size = world()
        conf = job.conf
        self.steps = job.source.steps if job.source else steps_per_epoch(job.splits, conf.batch_size * self.size)
        self.optimizer = make_optimizer(job.trainable.parameters(), conf)
        for group in self.optimizer.param_groups:
            group["lr"] *= self.size
        self.scheduler = make_scheduler(self.optimizer, conf, self.steps)
        self.scaler = torch.amp.GradScaler(job.device.type, enabled=job.amp and job.device.type == "cuda")
        self.amp_dtype = torch.float16 if job.device.type == "cuda" else torch.bfloat16
        self.fmt = torch.channels_last if job.channels_last else torch.contiguous_format
        self.state: dict[str, Any] = {
            "epoch": 0, "history": [], "best_val_top1": -1.0, "best_epoch": 0, "best_state": None,
        }  # fmt: skip
        job.work_dir.mkdir(parents=True, exist_ok=True)
        self.ckpt = job.work_dir / CHECKPOINT
        self.seen, self.busy = 0, 0.0

    def run(self) -> dict[str, Any]:
        from tqdm import tqdm

        job, conf = self.job, self.job.conf
        self.resume()
        job.model.to(job.device)
        job.model.to(memory_format=self.fmt)
        if job.compile:
            job.model.compile()
        # disable=None: tqdm draws only on a terminal, so CI logs get the per-epoch lines, not bar redraws
        self.bar = tqdm(
            total=conf.epochs * self.steps, initial=self.state["epoch"] * self.steps, desc=job.desc, unit="step",
            disable=None if job.progress and self.rank == 0 else True, dynamic_ncols=True, leave=False,
        )  # fmt: skip
        if job.keep_start and self.rank == 0 and self.state["epoch"] == 0 and self.state["best_state"] is None:
            start = self.val_top1()
            self.state.update(best_val_top1=start, best_epoch=0, best_state=_cpu_state(job.model), start_val_top1=start)
            job.log(f"{job.desc}: val top-1 {start:.4f} before training")
        try:
            for epoch in range(self.state["epoch"], conf.epochs):
                loss, n, seconds = self.train_epoch(epoch)
                if self.rank != 0:  # rank 0 evaluates, selects and checkpoints
                    self.state["epoch"] = epoch + 1
                    continue
                self.end_epoch(epoch, loss, n, seconds)
        finally:
            self.bar.close()
        return self.result() if self.rank == 0 else {}

    def resume(self) -> None:
        """Continue from the last completed epoch's checkpoint, if a killed run left one. A checkpoint that
        cannot be read or applied (truncated, damaged, of another shape) is discarded with a warning and the
        previous one is tried; with none left, training starts over — never a crash."""
        job = self.job
        candidates = [p for p in (self.ckpt, self.ckpt.with_name(PREVIOUS)) if p.is_file()]
        if not candidates:
            return
        fresh = self._snapshot()
        for path in candidates:
            try:
                saved = _load_checkpoint(path)
                job.model.load_state_dict(saved["model"])
                self.optimizer.load_state_dict(saved["optimizer"])
                self.scheduler.load_state_dict(saved["scheduler"])
                if saved.get("scaler"):
                    self.scaler.load_state_dict(saved["scaler"])
                if job.source is not None:
                    job.source.load_state_dict(saved["source"])
                torch.set_rng_state(saved["rng"])
            except Exception as exc:  # torch.load and load_state_dict raise many types; each means "unusable"
                log.warning("%s: discarding unreadable checkpoint %s (%s)", job.desc, path, describe(exc))
                self._restore(fresh)
                if self.rank == 0:
                    path.unlink(missing_ok=True)
                    _digest_file(path).unlink(missing_ok=True)
                continue
            self.state = saved["state"]
            job.log(f"{job.desc}: resuming after epoch {self.state['epoch']}/{job.conf.epochs} from {path}")
            return
        log.warning("%s: no usable checkpoint left in %s; training starts over", job.desc, job.work_dir)

    def _snapshot(self) -> dict[str, Any]:
        """The freshly initialised model, optimiser, scheduler and RNG, to return to if resuming fails halfway."""
        return copy.deepcopy(
            {
                "model": self.job.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "rng": torch.get_rng_state(),
                "source": self.job.source.state_dict() if self.job.source else None,
            }
        )

    def _restore(self, fresh: dict[str, Any]) -> None:
        self.job.model.load_state_dict(fresh["model"])
        self.optimizer.load_state_dict(fresh["optimizer"])
        self.scheduler.load_state_dict(fresh["scheduler"])
        if fresh["scaler"]:
            self.scaler.load_state_dict(fresh["scaler"])
        if self.job.source is not None:
            self.job.source.load_state_dict(fresh["source"])
        torch.set_rng_state(fresh["rng"])

    def train_epoch(self, epoch: int) -> tuple[float, int, float]:
        """One pass over the training batches; returns (mean loss, images of all ranks, seconds)."""
        from kdpipe.ml.runtime.distributed import average_buffers, average_gradients

        job, conf, rank, size = self.job, self.job.conf, self.rank, self.size
        job.trainable.train()
        t0, total_loss, n = time.perf_counter(), 0.0, 0
        batches = (
            job.source.batches(epoch)
            if job.source
            else train_batches(job.splits, conf.batch_size * size, conf.seed, epoch, job.augment, job.views)
        )
        for batch in batches:
            if size > 1:
                if len(batch.y) < 2 * size:  # every shard needs 2 images for BatchNorm; same on all ranks
                    continue
                batch = batch.shard(rank, size)
            batch = batch.to(job.device, self.fmt)
            batch.epoch = epoch
            with torch.autocast(job.device.type, dtype=self.amp_dtype, enabled=job.amp):
                loss = job.loss_fn(batch)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if size > 1:
                average_gradients(job.trainable, size)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            total_loss += loss.item() * len(batch.y)
            n += len(batch.y)
            self.bar.update(1)
            elapsed = self.busy + time.perf_counter() - t0
            self.bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.4f}", img_s=f"{(self.seen + n) / elapsed:.0f}")
        seconds = time.perf_counter() - t0
        mean_loss = total_loss / max(1, n)
        n *= size  # images of all ranks
        self.busy += seconds
        self.seen += n
        if size > 1:
            average_buffers(job.model, size)
        return mean_loss, n, seconds

    def val_top1(self) -> float:
        job, splits = self.job, self.job.splits
        mean, std = splits.data.mean, splits.data.std
        logits = predict(job.model, splits.val_x, mean, std, job.eval_batch_size, job.device, job.channels_last)
        return accuracy(logits, splits.val_y)

    def end_epoch(self, epoch: int, loss: float, n: int, seconds: float) -> None:
        """Evaluate on the val split, keep the best weights, checkpoint, and say how the epoch went."""
        job, state = self.job, self.state
        val_top1 = self.val_top1()
        record = {
            "epoch": epoch + 1,
            "train_loss": loss,
            "val_top1": val_top1,
            "lr": self.optimizer.param_groups[0]["lr"],
            "seconds": seconds,
            "images_per_second": n / seconds if seconds else 0.0,
            **(job.source.epoch_record() if job.source else {}),
        }
        state["history"].append(record)
        if val_top1 > state["best_val_top1"]:
            state.update(best_val_top1=val_top1, best_epoch=epoch + 1, best_state=_cpu_state(job.model))
        state["epoch"] = epoch + 1
        _save_atomic(
            {
                "model": job.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": torch.get_rng_state(),
                "scaler": self.scaler.state_dict(),
                **({"source": job.source.state_dict()} if job.source else {}),
                "state": state,
            },
            self.ckpt,
        )
        line = (
            f"{job.desc} epoch {epoch + 1}/{job.conf.epochs}: loss {loss:.4f}, val top-1 {val_top1:.4f}, "
            f"{record['images_per_second']:.0f} img/s"
        )
        self.bar.write(line) if job.progress else job.log(line)

    def result(self) -> dict[str, Any]:
        job, state = self.job, self.state
        job.model.load_state_dict(state["best_state"])
        job.model.to(memory_format=torch.contiguous_format)
        done = state["history"]
        seconds = sum(h["seconds"] for h in done)
        ips = sum(h["images_per_second"] * h["seconds"] for h in done) / max(1e-9, seconds)
        return {
            "best_state": state["best_state"],
            "best_val_top1": state["best_val_top1"],
            "best_epoch": state["best_epoch"],
            "history": done,
            "images_per_second": ips,
            **({"start_val_top1": state["start_val_top1"]} if "start_val_top1" in state else {}),
        }


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
