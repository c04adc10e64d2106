"""Data-parallel training: N processes joined in a torch.distributed process group.

Two ways in, one training loop (:func:`kdpipe.ml.train.training.fit` asks :func:`world` for its rank and size):

- ``runtime.nproc: N`` (``kdpipe run --nproc N``), CPU: this process is rank 0 and forks ranks 1..N-1
  around each training run, so they inherit the models, data and closures without pickling them (gloo).
  CUDA cannot be used after a fork, so this way is CPU only.
- ``torchrun --nproc_per_node N -m kdpipe.cli run ...``: every rank is a whole ``kdpipe run``; rank 0
  plans, runs every stage and alone writes the cache, the other ranks follow it into the training stages
  (:func:`join_launched` picks NCCL on CUDA, one GPU per local rank, and gloo on CPU).

Either way rank 0 keeps the result and is the only one that writes checkpoints and the cache.
"""

from __future__ import annotations

import contextlib
import os
import time
import traceback
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist

from kdpipe.config import LoadedConfig
from kdpipe.errors import ConfigError
from kdpipe.launch import Launch, launched

T = TypeVar("T")
TIMEOUT = timedelta(minutes=10)  # a dead peer is noticed at the next collective, within this


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def join_launched(device: torch.device, launch: Launch) -> int:
    """Join the process group torchrun set up (``env://``): NCCL with one GPU per local rank on CUDA, else
    gloo. Returns this process's rank."""
    rank, size, local = launch.rank, launch.world_size, launch.local_rank
    backend = "gloo"
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise RuntimeError(
                f"local rank {local} has no GPU (this machine has {torch.cuda.device_count()}); "
                "use --nproc_per_node <= the GPU count"
            )
        torch.cuda.set_device(local)
        backend = "nccl"
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=size, timeout=TIMEOUT)
    return rank


@contextlib.contextmanager
def launched_role(cfg: LoadedConfig) -> Iterator[str | None]:
    """The torchrun role of this process for one run: ``None`` outside torchrun, else ``"leader"`` (rank 0: plans,
    runs every stage, alone writes the cache and the report) or ``"follower"`` (trains beside it). Joins the
    process group on entry and leaves it on exit. The runner asks :func:`kdpipe.launch.launched` first, so a
    plain run never imports this module (nor torch)."""
    launch = launched()
    if launch is None:
        yield None
        return
    from kdpipe.ml.runtime.device import pick_device

    if cfg.config.runtime.nproc > 1:
        raise ConfigError(
            "runtime.nproc",
            f"forks its own workers; under torchrun the process count is its --nproc_per_node "
            f"({launch.world_size} here): drop --nproc / runtime.nproc",
            cfg.source,
        )
    join_launched(pick_device(cfg.config.runtime.device), launch)
    try:
        yield launch.role
    finally:
        leave()


def leave() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_object(obj: T) -> T:
    """Rank 0's ``obj`` on every rank (its value elsewhere is ignored)."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    dist.barrier()


def _join(rank: int, size: int, init_file: Path) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=size, timeout=TIMEOUT)


def _child(rank: int, size: int, init_file: Path, threads: int, fn: Callable[[], object]) -> None:
    code = 0
    try:
        torch.set_num_threads(threads)
        _join(rank, size, init_file)
        fn()
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        os._exit(code)  # never return into the parent's code path (atexit, pytest, click)


def _probe() -> None:
    x = torch.ones(2, requires_grad=True)
    (x * 2).sum().backward()
    os._exit(0)


def run_data_parallel(nproc: int, work_dir: Path, fn: Callable[[], T]) -> T:
    """Run ``fn`` in ``nproc`` processes (this one and ``nproc - 1`` forks) joined in a gloo process group;
    return rank 0's result."""
    if torch.cuda.is_initialized():
        raise RuntimeError(
            "runtime.nproc forks CPU workers, which CUDA does not allow; on GPUs launch with torchrun instead: "
            "torchrun --standalone --nproc_per_node N -m kdpipe.cli run -c CONFIG"
        )
    ctx = torch.multiprocessing.get_context("fork")
    probe = ctx.Process(target=_probe)  # autograd refuses to run in a fork of some processes: find out first
    probe.start()
    probe.join(timeout=60)
    if probe.exitcode != 0:
        raise RuntimeError(
            "data-parallel training cannot fork workers from this process (its autograd engine has started "
            "threads, e.g. an ONNX export ran here first); start it in a fresh process, e.g. a new `kdpipe run`"
        )
    work_dir.mkdir(parents=True, exist_ok=True)
    init_file = work_dir / f".dist-{os.getpid()}-{time.time_ns()}"
    threads = max(1, torch.get_num_threads() // nproc)
    children = [ctx.Process(target=_child, args=(r, nproc, init_file, threads, fn)) for r in range(1, nproc)]
    for child in children:
        child.start()
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _join(0, nproc, init_file)
        result = fn()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        torch.set_num_threads(saved_threads)
        for child in children:
            child.join(timeout=60)
            if child.is_alive():
                child.kill()
        init_file.unlink(missing_ok=True)
    failed = [c.exitcode for c in children if c.exitcode != 0]
    if failed:
        raise RuntimeError(f"{len(failed)} data-parallel worker(s) failed (exit codes {failed})")
    return result


def average_gradients(module: torch.nn.Module, size: int) -> None:
    """All-reduce and average the gradients (one flat buffer: one collective per step)."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= size
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def average_buffers(module: torch.nn.Module, size: int) -> None:
    """Average floating-point buffers (BatchNorm running statistics) so every rank holds the same model."""
    for buf in module.buffers():
        if buf.is_floating_point():
            dist.all_reduce(buf)
            buf /= size
