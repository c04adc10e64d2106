"""Distillation without the training set: test top-1 against the number of real training images the student used.

Each row is a cached ``kdpipe run`` of a config copied into the work folder (its cache and outputs there), so an
interrupted benchmark resumes where it stopped and a finished row costs nothing the second time. Every row's
epoch is chosen on the validation split; test top-1 is only reported.

``--part datafree``  ``configs/data-free.yaml`` run whole (``distill.data: synthetic``: the shipped Fashion-MNIST
                     teacher, a generator trained against it, a ResNet-8 student that never sees a training image;
                     exported, parity-checked, gated), beside the same student, recipe and seed distilled with KD
                     from all 54,000 real training images (``--set distill.data=real``, the teacher's features
                     cached once). Prints, last, ``data-free top-1 = X``.

Further parts (dataset condensation's rows) are one function each in :data:`PARTS`.

    python benchmarks/datafree.py --part datafree [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from cached_runs import run_cached, work_copy

ROOT = Path(__file__).resolve().parent.parent


def run(config: Path, overrides: dict[str, object], until: str | None = None) -> tuple[dict, dict, float]:
    """One cached ``kdpipe run`` (exit 1, a failed gate, is a result, not a failure); returns the distill and
    validate metrics of the run and its wall-clock seconds."""
    done = run_cached(config, overrides, until=until, gates_fail=True)
    return done.metrics("distill"), done.metrics("validate"), done.wall


def row(label: str, distill: dict, validate: dict) -> dict[str, object]:
    data = distill.get("training_data") or {}
    return {
        "method": label,
        "real": data.get("real_training_images"),
        "val": distill["best_val_top1"],
        "test": validate["student"]["top1"],
        "train_s": sum(h["seconds"] for h in distill["history"]),
    }


def table(rows: list[dict[str, object]]) -> str:
    lines = ["| method | real training images used | val top-1 | test top-1 | training s |", "|---|---|---|---|---|"]
    for r in rows:
        real = "?" if r["real"] is None else f"{r['real']:,}"
        lines.append(f"| {r['method']} | {real} | {100 * r['val']:.2f}% | {100 * r['test']:.2f}% | "
                     f"{r['train_s']:.0f} |")  # fmt: skip
    return "\n".join(lines)


def part_datafree(work: Path) -> None:
    config = work_copy(ROOT / "configs" / "data-free.yaml", work / "datafree", rows=False)
    free, free_val, seconds = run(config, {})  # the whole pipeline: export, parity, benchmark, gates
    report = json.loads((work / "datafree" / "out" / "report.json").read_text())
    print(f"  data-free run: {seconds:.0f} s wall-clock", file=sys.stderr, flush=True)
    # the same student, recipe and seed on every real training image, for as many images as the data-free student
    # drew from its generator (whole epochs of the real split, at least one); the teacher's features cached once
    real_sets = {"distill.data": "real", "features.enabled": "true", "features.views": 1,
                 "distill.train.epochs": real_epochs(config)}  # fmt: skip
    real, real_val, real_seconds = run(config, real_sets, until="validate")
    print(f"  real-data kd run: {real_seconds:.0f} s wall-clock", file=sys.stderr, flush=True)
    rows = [row("kd, data-free (synthetic)", free, free_val), row("kd, all real training images", real, real_val)]
    print("Fashion-MNIST, shipped wrn_16_2 teacher -> resnet8 student (configs/data-free.yaml), seed 0:")
    print(table(rows))
    generator = (free.get("training_data") or {}).get("generator") or {}
    collapse = ((free.get("training_data") or {}).get("collapse") or {}).get("detected")
    print(f"generator terms: {', '.join(generator.get('terms') or [])}; collapse detected: {bool(collapse)}")
    gates = report.get("gates") or []
    failed = [g["name"] for g in gates if not g.get("passed")]
    print(f"data-free student gates: {len(gates) - len(failed)} of {len(gates)} pass" +
          (f" (failed: {', '.join(failed)})" if failed else ""))  # fmt: skip
    teacher = validate_teacher_top1(free_val)
    print(f"teacher top-1 = {100 * teacher:.2f}%")
    print(f"data-free top-1 = {100 * free_val['student']['top1']:.2f}%")


def real_epochs(config: Path) -> int:
    """Epochs of the real training split that show the student as many images as the data-free run's batches did
    (``epochs x datafree.steps_per_epoch x batch_size``), at least one."""
    from kdpipe.config import load_config
    from kdpipe.preflight import training_split_images

    cfg = load_config(config)
    train = cfg.config.distill.train
    drawn = train.epochs * cfg.config.distill.datafree.steps_per_epoch * train.batch_size
    split = training_split_images(cfg)
    return train.epochs if split is None else max(1, round(drawn / split))


def validate_teacher_top1(validate: dict) -> float:
    return validate["teacher"]["top1"]


#: one function per part: condensation's rows join as ``"condensed": part_condensed``
PARTS: dict[str, Callable[[Path], None]] = {"datafree": part_datafree}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=sorted(PARTS), required=True)
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kdpipe" / "bench-datafree"
    parser.add_argument("--work", type=Path, default=default, help="cache and outputs of every row (kept: resumes)")
    args = parser.parse_args()
    PARTS[args.part](args.work.resolve())


if __name__ == "__main__":
    main()
