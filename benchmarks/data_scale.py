"""Memory of a whole run against the dataset size, and streaming against in-memory training speed.

Generates an ImageFolder of 224-px JPEGs with real content (Fashion-MNIST images resized and tinted a
random colour) at N and 4N training images, runs ``kdpipe run --until distill`` (teacher trained, then
SimKD) on each with tiny models and a fixed number of training steps (``data.train_subset``: the same
images per epoch at both sizes, while listing, fingerprint, split and validation see the whole set), and
samples the memory of the whole run several times a second: the sum of PSS of the kdpipe process and
every process under it (the loader workers), so pages the workers share with it are counted once.

It then trains the same tiny models on a 64-px copy of the N images twice, in memory and streamed with
2 loader workers, and prints the training loop's images/s of each.

The images are generated once into ``--work`` (default: ``$XDG_CACHE_HOME/kdpipe/data_scale``) and
reused. The last two lines read exactly::

    peak rss at 4N = <MB> MB
    rss ratio 4N/N = <x.xx>

    python benchmarks/data_scale.py [--n 5000] [--steps 16] [--speed-steps 48] [--repeats 2] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import yaml

CLASSES = ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]
BATCH = 64


def fashion() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from kdpipe.config import load_config
    from kdpipe.ml.data.memory import _read_idx
    from kdpipe.ml.data.sources import locate_fashion_mnist

    f = locate_fashion_mnist(load_config(None))
    return (
        _read_idx(f["train-images-idx3-ubyte"]),
        _read_idx(f["train-labels-idx1-ubyte"]),
        _read_idx(f["t10k-images-idx3-ubyte"]),
        _read_idx(f["t10k-labels-idx1-ubyte"]),
    )


def _write(job: tuple[str, np.ndarray, int, int]) -> None:
    from PIL import Image

    path, gray, size, seed = job
    tint = np.random.default_rng(seed).uniform(0.35, 1.0, 3)
    image = Image.fromarray(gray).resize((size, size), Image.BICUBIC)
    rgb = (np.asarray(image, dtype=np.float32)[..., None] * tint).clip(0, 255).astype(np.uint8)
    Image.fromarray(rgb).save(path, quality=90)


def generate(
    root: Path, images: np.ndarray, labels: np.ndarray, test: tuple[np.ndarray, np.ndarray], size: int
) -> None:
    """``root/{train,test}/<class>/<i>.jpg``, written by two processes; skipped when already complete."""
    done = root / ".complete"
    if done.is_file():
        return
    jobs = []
    for split, (xs, ys) in (("train", (images, labels)), ("test", test)):
        for c in CLASSES:
            (root / split / c).mkdir(parents=True, exist_ok=True)
        jobs += [(str(root / split / CLASSES[y] / f"{i:06d}.jpg"), x, size, i + (0 if split == "train" else 10**6))
                 for i, (x, y) in enumerate(zip(xs, ys, strict=True))]  # fmt: skip
    with Pool(2) as pool:
        pool.map(_write, jobs, chunksize=64)
    done.write_text("ok\n")


def link_subset(full: Path, root: Path, n: int) -> None:
    """An ImageFolder of the first ``n`` training images of ``full`` (hard links: no second copy), same test set."""
    done = root / ".complete"
    if done.is_file():
        return
    for split in ("train", "test"):
        for src in sorted((full / split).rglob("*.jpg")):
            if split == "train" and int(src.stem) >= n:
                continue
            dst = root / src.relative_to(full)
            dst.parent.mkdir(parents=True, exist_ok=True)
            if not dst.exists():
                os.link(src, dst)
    done.write_text("ok\n")


def tree_pss_kb(pid: int) -> int:
    """Sum of PSS (kB) of ``pid`` and all its descendants (0 for processes that are gone)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
                    break
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return total


def run(root: Path, data: dict, workdir: Path, steps: int) -> tuple[float, float, dict]:
    """``kdpipe run --until distill`` in ``workdir``: (peak MB of the process tree, seconds, distill metrics)."""
    config = {
        "cache_dir": str(workdir / "cache"),
        "output_dir": str(workdir / "out"),
        "data": {
            "dataset": "imagefolder",
            "root": str(root),
            "train_subset": steps * BATCH,
            "val_fraction": 0.02,
            **data,
        },
        "teacher": {"arch": "tiny_cnn_wide", "train": {"epochs": 1, "batch_size": BATCH, "lr": 0.05}},
        "distill": {"student": "tiny_cnn", "train": {"epochs": 1, "batch_size": BATCH, "lr": 0.05}},
        "runtime": {"progress": False, "threads": 1},
    }
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "pipeline.yaml").write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-c", "from kdpipe.cli import entry; entry()", "run", "-c", "pipeline.yaml",
           "--until", "distill"]  # fmt: skip
    shutil.rmtree(workdir / "cache", ignore_errors=True)  # a cold run every time
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = [0]

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_pss_kb(proc.pid))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = proc.communicate()
    sampler.join()
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"kdpipe run failed in {workdir}:\n{out}")
    metrics = json.loads(next((workdir / "cache" / "distill").glob("*/metrics.json")).read_text())
    return peak[0] / 1024, seconds, metrics


def speed_runs(px64: Path, runs: Path, args: argparse.Namespace) -> None:
    """Training images/s of the distill loop on 64-px data, in memory and streamed with 2 workers; the runs are
    interleaved (the machine's other load hits both alike) and each path's best is compared."""
    speed: dict[str, list[float]] = {"in-memory": [], "streaming": []}
    for _ in range(args.repeats):
        for name, data in (("in-memory", {"in_memory": True}), ("streaming", {"in_memory": False, "workers": 2})):
            _, seconds, m = run(px64, data, runs / f"speed-{name}", args.speed_steps)
            speed[name].append(m["images_per_second"])
            print(f"64 px, {name:9s}: {speed[name][-1]:7.0f} training images/s (distill loop), run {seconds:.0f} s",
                  flush=True)  # fmt: skip
    best = {k: max(v) for k, v in speed.items()}
    print(f"streaming / in-memory = {best['streaming'] / best['in-memory']:.2f} (best of {args.repeats} each; "
          f"2 workers on {os.cpu_count()} cores)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=5000, help="N: training images of the smaller set (4N ≤ 60,000)")
    parser.add_argument("--steps", type=int, default=16, help=f"training steps per stage (batch {BATCH})")
    parser.add_argument("--test", type=int, default=500, help="test images")
    parser.add_argument("--speed-steps", type=int, default=48, help="training steps of the 64-px speed runs")
    parser.add_argument("--repeats", type=int, default=2, help="speed runs per path (interleaved; best kept)")
    parser.add_argument("--part", choices=("all", "speed", "memory"), default="all", help="run only one half")
    parser.add_argument("--work", type=Path, default=None, help="where the images and runs go (kept, reused)")
    args = parser.parse_args()
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    work = args.work or cache / "kdpipe" / "data_scale"
    n4 = 4 * args.n
    t0 = time.perf_counter()
    train_x, train_y, test_x, test_y = fashion()
    test = (test_x[: args.test], test_y[: args.test])
    full = work / f"jpeg224-{n4}-{args.test}"
    generate(full, train_x[:n4], train_y[:n4], test, 224)
    small = work / f"jpeg224-{args.n}-{args.test}"
    link_subset(full, small, args.n)
    px64 = work / f"jpeg64-{args.n}-{args.test}"
    generate(px64, train_x[: args.n], train_y[: args.n], test, 64)
    print(f"data: {n4} + {args.test} 224-px JPEGs in {full} ({time.perf_counter() - t0:.0f} s incl. reuse)", flush=True)

    runs = work / "runs"
    if args.part != "memory":
        speed_runs(px64, runs, args)
        if args.part == "speed":
            return
    peaks = {}
    for label, root, size in (("N", small, args.n), ("4N", full, n4)):
        peak, seconds, _ = run(root, {"in_memory": False, "workers": 2}, runs / f"scale-{label}", args.steps)
        peaks[label] = peak
        print(f"{label:>2} = {size:6d} images at 224 px, streamed: peak {peak:6.0f} MB (main + workers, PSS), "
              f"run {seconds:.0f} s", flush=True)  # fmt: skip
    print(f"peak rss at 4N = {peaks['4N']:.0f} MB")
    print(f"rss ratio 4N/N = {peaks['4N'] / peaks['N']:.2f}")


if __name__ == "__main__":
    main()
