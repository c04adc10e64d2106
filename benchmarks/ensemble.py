"""Several teachers against the best one: the ensemble student vs the best single-teacher student, same recipe.

``configs/ensemble.yaml`` (or ``--config``): Fashion-MNIST, a ResNet-8 student, several teachers trained here by
their recipes in that file (or loaded), cached. Every row is a cached ``kdpipe run`` in the work folder, so an
interrupted run resumes where it stopped; the teachers and their features are shared by every row (a teacher's
cache entry is the same whether it is one of several or alone):

1. a single-teacher student of each teacher (that teacher as ``teacher:``, everything else as the config), seed 0;
2. the best of them on *validation* top-1, seeds 1 and 2;
3. the ensemble student (the config as it is), seeds 0, 1 and 2; seed 0 runs the whole pipeline (export, parity,
   benchmark, the config's gates), the others stop after validate.

The epoch of every student is chosen on the validation split; test top-1 is only reported. Prints each teacher's
and the ensemble's test top-1, the students' table, the ensemble student's parity and gates, then, last,
``ensemble gain = Y pp`` (ensemble student minus best single-teacher student, test top-1, mean of the 3 seeds).

    python benchmarks/ensemble.py [--config FILE] [--work DIR] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import yaml
from cached_runs import key_value, run_cached, work_copy

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "ensemble.yaml"
SEEDS = (0, 1, 2)


def prepare(config: Path, work: Path) -> tuple[Path, dict[str, Path]]:
    """Copies of the ensemble config and of one single-teacher config per teacher in ``work``, every one with its
    cache there (shared) and outputs of its own (named after the config, so several configs can share ``work``)."""
    conf = yaml.safe_load(config.read_text())
    stem = config.stem
    ensemble = work_copy(conf, work, f"{stem}.yaml", rows=False, outputs=f"out-{stem}")
    singles = {}
    for member in conf["teachers"]:
        name = member["name"]
        single = {k: v for k, v in conf.items() if k not in ("teachers", "gates")}
        single["teacher"] = {k: v for k, v in member.items() if k not in ("name", "weight")}
        singles[name] = work_copy(single, work, f"{stem}-single-{name}.yaml", rows=False, outputs=f"out-{stem}-{name}")
    return ensemble, singles


def run_row(config: Path, seed: int, whole: bool = False, extra: dict[str, str] | None = None) -> dict:
    """Train (or find cached) one student: val top-1 from the distill stage (the selected epoch), test top-1 from
    the validate stage; ``whole`` runs every stage with the config's gates (exit 1 is a failed gate, reported).
    ``extra``: ``--set`` overrides of every row (the same recipe change for the single and ensemble students)."""
    overrides = {**(extra or {}), "distill.train.seed": seed}
    run = run_cached(config, overrides, until=None if whole else "validate", gates_fail=whole)
    validate, distill = run.metrics("validate"), run.metrics("distill")
    row = {
        "val": 100 * distill["best_val_top1"],
        "test": 100 * validate["student"]["top1"],
        "seconds": distill["seconds"],
        "wall": run.wall,
        "teacher_test": 100 * validate["teacher"]["top1"],
        "teachers_test": {n: 100 * v["top1"] for n, v in (validate.get("teachers") or {}).items()},
    }
    if whole:
        row["report"] = run.report()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kdpipe" / "bench-ensemble"
    parser.add_argument("--config", type=Path, default=CONFIG, help="the ensemble config (default %(default)s)")
    parser.add_argument("--work", type=Path, default=default, help="cache and outputs of every row (kept: resumes)")
    parser.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE", type=key_value,
                        help="also override this in every row, e.g. distill.method=simkd")  # fmt: skip
    args = parser.parse_args()
    extra = dict(args.extra)
    started = time.perf_counter()
    ensemble, singles = prepare(args.config.resolve(), args.work.resolve())

    def say(text: str) -> None:
        print(f"  [{(time.perf_counter() - started) / 60:5.1f} min] {text}", file=sys.stderr, flush=True)

    single: dict[str, list[dict]] = {}
    for name, config in singles.items():
        single[name] = [run_row(config, 0, extra=extra)]
        say(f"single {name} seed 0: val {single[name][0]['val']:.2f}%, test {single[name][0]['test']:.2f}%")
    best = max(single, key=lambda n: single[n][0]["val"])
    for seed in SEEDS[1:]:
        single[best].append(run_row(singles[best], seed, extra=extra))
        say(f"single {best} seed {seed}: test {single[best][-1]['test']:.2f}%")
    both: list[dict] = []
    for seed in SEEDS:
        both.append(run_row(ensemble, seed, whole=seed == 0, extra=extra))
        say(f"ensemble seed {seed}: val {both[-1]['val']:.2f}%, test {both[-1]['test']:.2f}%")

    teachers = both[0]["teachers_test"]
    print("teachers (test top-1): " + ", ".join(f"{n} {v:.2f}%" for n, v in teachers.items())
          + f"; their ensemble (mean logits) {both[0]['teacher_test']:.2f}%")  # fmt: skip
    recipe = f"{args.config.name}'s recipe" + "".join(f", {k}={v}" for k, v in extra.items())
    print(f"| student (resnet8, {recipe}) | seed | val top-1 | test top-1 | train s |")
    print("|---|---|---|---|---|")
    for name, rows in single.items():
        for seed, r in zip(SEEDS, rows, strict=False):
            mark = " (best on val)" if name == best else ""
            print(f"| teacher {name} alone{mark} | {seed} | {r['val']:.2f}% | {r['test']:.2f}% | {r['seconds']:.0f} |")
    for seed, r in zip(SEEDS, both, strict=True):
        print(f"| all {len(singles)} teachers | {seed} | {r['val']:.2f}% | {r['test']:.2f}% | {r['seconds']:.0f} |")
    gains = [e["test"] - s["test"] for e, s in zip(both, single[best], strict=True)]
    print("per seed, ensemble - best single (pp): " + ", ".join(f"{g:+.2f}" for g in gains)
          + f"; ahead on every seed: {'yes' if all(g > 0 for g in gains) else 'no'}")  # fmt: skip
    report = both[0]["report"]
    student = report["models"]["student"]
    gates = report.get("gates") or []
    passed = sum(g["passed"] for g in gates)
    failed = "".join(f"; FAILED {g['name']} (measured {g['measured']:.4g})" for g in gates if not g["passed"])
    print(f"ensemble student, seed 0: {student['onnx']['file']} (one graph, {student['parameters']:,} parameters), "
          f"parity max |Δ| {student['onnx']['parity']['max_abs_diff']:.1e}; gates {passed} of {len(gates)} passed"
          f"{failed}")  # fmt: skip
    print(f"total {(time.perf_counter() - started) / 60:.1f} min")
    print(f"ensemble gain = {statistics.mean(gains):+.2f} pp")


if __name__ == "__main__":
    main()
