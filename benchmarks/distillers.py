"""Every distillation method in one harness: the same student, data, recipe, seed and batches, test top-1.

Two parts, each row a cached ``kdpipe run --until distill`` in the work folder, so an interrupted run resumes
where it stopped (the teacher and its cached features are shared by every row):

``--part demo``  the demo's budget (``pipeline.yaml``: 15,000 training images, 4 epochs, the shipped
                 teacher): scratch, zipf_ls, KD, DKD, CRD, SimKD (the paper's loss) and SimKD with its
                 short-budget preset. Prints, last, ``simkd at demo budget - scratch = Y pp``.
``--part full``  the 30-epoch recipe of ``configs/fashion-mnist.yaml`` (its own teacher, trained once and
                 cached): scratch, zipf_ls, KD at T 1 and T 4, DKD, CRD, CRD+KD and SimKD (paper, short) on seed 0; then
                 seeds 1 and 2 for the two distilled methods best on *validation* at seed 0; mean ± sd of test
                 top-1. Prints, last, ``best distilled = X (method)`` (mean of 3 seeds). Hours on 2 cores.

The epoch of every student is chosen on the validation split; test top-1 is only reported.

    python benchmarks/distillers.py --part demo [--work DIR]
    python benchmarks/distillers.py --part full [--work DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

from cached_runs import run_cached, work_copy

ROOT = Path(__file__).resolve().parent.parent


#: (row label, --set overrides); every row trains exactly one method (compare: [])
DEMO_ROWS = [
    ("scratch", {"distill.method": "scratch"}),
    ("zipf_ls", {"distill.method": "zipf_ls"}),
    ("kd", {"distill.method": "kd"}),
    ("dkd", {"distill.method": "dkd"}),
    ("crd", {"distill.method": "crd", "distill.crd.negatives": 4096}),  # the demo trains on 15,000 images
    ("simkd (paper)", {"distill.method": "simkd", "distill.simkd.preset": "paper"}),
    ("simkd (preset short)", {"distill.method": "simkd", "distill.simkd.preset": "short"}),
]
FULL_ROWS = [
    ("scratch", {"distill.method": "scratch"}),
    ("zipf_ls", {"distill.method": "zipf_ls"}),
    ("kd T1", {"distill.method": "kd", "distill.kd.temperature": 1}),
    ("kd T4", {"distill.method": "kd", "distill.kd.temperature": 4}),
    ("dkd", {"distill.method": "dkd"}),
    ("crd", {"distill.method": "crd"}),
    ("crd+kd", {"distill.method": "crd_kd"}),
    ("simkd", {"distill.method": "simkd", "distill.simkd.preset": "paper"}),
    ("simkd short", {"distill.method": "simkd", "distill.simkd.preset": "short"}),
]
NOT_DISTILLED = {"scratch", "zipf_ls"}  # no teacher: baselines, never "best distilled"


def run_row(config: Path, overrides: dict[str, object], seed: int) -> dict[str, float]:
    """Train (or find cached) one row: val top-1 from the distill stage (the selected epoch), test top-1 from
    the validate stage."""
    run = run_cached(config, {**overrides, "distill.train.seed": seed})
    distill = run.metrics("distill")
    return {
        "val": 100 * distill["best_val_top1"],
        "test": 100 * run.metrics("validate")["student"]["top1"],
        "seconds": distill["seconds"],
    }


def table(results: dict[str, list[dict[str, float]]]) -> str:
    lines = ["| method | seeds | val top-1 | test top-1 (mean ± sd) | train s (seed 0) |", "|---|---|---|---|---|"]
    for label, rows in results.items():
        tests = [r["test"] for r in rows]
        sd = f" ± {statistics.stdev(tests):.2f}" if len(tests) > 1 else ""
        val = statistics.mean(r["val"] for r in rows)
        lines.append(
            f"| {label} | {len(rows)} | {val:.2f}% | {statistics.mean(tests):.2f}%{sd} | {rows[0]['seconds']:.0f} |"
        )
    return "\n".join(lines)


def part_demo(work: Path) -> None:
    config = work_copy(ROOT / "pipeline.yaml", work / "demo")
    results = {}
    for label, overrides in DEMO_ROWS:
        results[label] = [run_row(config, overrides, seed=0)]
        print(f"  {label}: test {results[label][0]['test']:.2f}%", file=sys.stderr, flush=True)
    print("demo budget (pipeline.yaml: 15,000 images, 4 epochs, shipped teacher), seed 0:")
    print(table(results))
    gap = results["simkd (preset short)"][0]["test"] - results["scratch"][0]["test"]
    print(f"simkd at demo budget - scratch = {gap:+.2f} pp")


def part_full(work: Path) -> None:
    config = work_copy(ROOT / "configs" / "fashion-mnist.yaml", work / "full")
    rows = dict(FULL_ROWS)
    results = {}
    for label, overrides in FULL_ROWS:
        results[label] = [run_row(config, overrides, seed=0)]
        print(f"  {label} seed 0: test {results[label][0]['test']:.2f}%", file=sys.stderr, flush=True)
    distilled = [label for label in results if label not in NOT_DISTILLED]
    best_two = sorted(distilled, key=lambda label: -results[label][0]["val"])[:2]
    for label in best_two:
        for seed in (1, 2):
            results[label].append(run_row(config, rows[label], seed=seed))
            print(f"  {label} seed {seed}: test {results[label][-1]['test']:.2f}%", file=sys.stderr, flush=True)
    print("full recipe (configs/fashion-mnist.yaml: 30 epochs, resnet8 student), seeds 1-2 for the two best on val:")
    print(table(results))
    best = max(best_two, key=lambda label: statistics.mean(r["test"] for r in results[label]))
    print(f"best distilled = {statistics.mean(r['test'] for r in results[best]):.2f} ({best})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["demo", "full"], required=True)
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kdpipe" / "bench-distillers"
    parser.add_argument("--work", type=Path, default=default, help="cache and outputs of every row (kept: resumes)")
    args = parser.parse_args()
    (part_demo if args.part == "demo" else part_full)(args.work.resolve())


if __name__ == "__main__":
    main()
