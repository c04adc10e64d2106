"""Distillation throughput against training the student alone, measured in one run on the same data.

Three ways to spend an epoch on the same images, models and recipe, all through kdpipe's own distill
stage and training loop (so harness overheads cancel):

- student-only: the student trained alone with cross-entropy (`distill.method: scratch`);
- naive SimKD: a teacher forward pass at every step (`features.enabled: false`);
- kdpipe SimKD: teacher feature maps read from the cached `features` artifact (`features.enabled: true`).

Each is run ``--repeats`` times in interleaved order (the machine is noisy) and the median images/s of
the training loop is kept. The one-off cost of computing the features is printed too, amortised over
the epochs. The last line reads ``ratio kdpipe/student-only = X.XX``.

    python benchmarks/distill_throughput.py [--images 8192] [--epochs 2] [--repeats 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import yaml


def config(root: Path, args: argparse.Namespace, method: str, cached: bool) -> Path:
    data = {"dataset": "fashion_mnist", "train_subset": args.images}
    if args.synthetic:
        data = {"dataset": "synthetic", "synthetic": {"num_classes": 10, "channels": 1, "image_size": 28,
                                                       "train_size": args.images + 1000, "test_size": 256}}  # fmt: skip
    recipe = {"epochs": args.epochs, "batch_size": 128, "lr": 0.05}
    body = {
        "cache_dir": str(root / "cache"),
        "output_dir": str(root / f"out-{method}-{cached}"),
        "data": data,
        "teacher": {"arch": args.teacher, "train": {"epochs": 1, "batch_size": 256}},
        "features": {"enabled": cached, "views": args.views},
        "distill": {"method": method, "student": args.student, "train": recipe},
        "runtime": {"progress": False},
    }
    path = root / f"{method}-{cached}.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8192, help="training images (a subset of Fashion-MNIST)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--teacher", default="resnet20")
    parser.add_argument("--student", default="resnet8")
    parser.add_argument("--synthetic", action="store_true", help="synthetic 28x28 data instead of Fashion-MNIST")
    args = parser.parse_args()

    from kdpipe.config import load_config
    from kdpipe.runner import run_pipeline

    runs = {"student-only": ("scratch", False), "naive SimKD": ("simkd", False), "kdpipe SimKD": ("simkd", True)}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        configs = {name: load_config(config(root, args, *how)) for name, how in runs.items()}
        print(f"teacher {args.teacher}, student {args.student}, {args.images} images, {args.epochs} epochs, "
              f"batch 128, {args.repeats} interleaved repeats")  # fmt: skip
        run_pipeline(configs["kdpipe SimKD"], until="features", echo=lambda s: None)  # teacher + features, once
        speeds: dict[str, list[float]] = {name: [] for name in runs}
        features_seconds = 0.0
        for _ in range(args.repeats):
            for name, cfg in configs.items():
                report = run_pipeline(cfg, until="distill", force=("distill",), echo=lambda s: None)
                speeds[name].append(report["training"]["distill"]["images_per_second"])
                if name == "kdpipe SimKD":
                    features_seconds = _features_seconds(cfg)
        med = {name: statistics.median(v) for name, v in speeds.items()}
        for name, v in med.items():
            print(f"{name:<14} {v:8.0f} images/s  (runs: {', '.join(f'{x:.0f}' for x in speeds[name])})")
        train_images = args.images * args.epochs
        amortised = train_images / (train_images / med["kdpipe SimKD"] + features_seconds)
        print(f"feature extraction once: {features_seconds:.1f} s for {args.views} views; kdpipe SimKD including it, "
              f"amortised over {args.epochs} epochs: {amortised:.0f} images/s")  # fmt: skip
        print(f"ratio naive/student-only = {med['naive SimKD'] / med['student-only']:.2f}")
        print(f"ratio kdpipe/student-only = {med['kdpipe SimKD'] / med['student-only']:.2f}")


def _features_seconds(cfg) -> float:
    import json

    from kdpipe.runner import read_last_run

    key = read_last_run(cfg)["stages"]["features"]["key"]
    return json.loads((cfg.cache_dir / "features" / key / "metrics.json").read_text())["seconds"]


if __name__ == "__main__":
    main()
