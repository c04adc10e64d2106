"""Condensed transfer sets against random real subsets of the same size: Fashion-MNIST, ResNet-8 student.

For each N in ``--per-class`` (default 10 and 50) it makes, with ``kdpipe condense`` on configs/condensed.yaml:

- ``dm-N``: N images per class by distribution matching (``--iterations``, ``--width``, ``--real-batch``,
  ``--lr``; seed 0), which starts from exactly the random real images of ``random-N`` seed 0;
- ``random-N/sS``: N random real training images per class (``--iterations 0``), for each seed in ``--seeds``.

Every set is then trained the same way, by ``kdpipe run -c configs/condensed.yaml --until distill`` with
``data.transfer_set`` pointing at it: the config's recipe (DSA on every batch, SGD, epochs of about 2,000 images:
``transfer_repeats`` is scaled to N) with ``--method`` (default ``scratch``: labels only, the condensation
papers' protocol; ``kd``: KD from the shipped wrn_16_2 teacher run on every transformed batch) and any ``--set``
given here. The student each run selects on Fashion-MNIST's val split is evaluated on its test split. The
whole-set row is not re-run: it is configs/fashion-mnist.yaml's measured scratch and KD students (README: 54,000
images, 30 epochs).

Sets and runs are cached in ``--work`` (default ``$XDG_CACHE_HOME/kdpipe/condensed``): a second call re-uses
what is there (a set is re-made only when its settings changed). Prints the table, then last::

    condensed-10 vs random-10 = <Y> pp

    python benchmarks/condensed.py [--per-class 10 50] [--iterations 2000] [--seeds 0 1 2] [--method scratch]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from cached_runs import key_value

from kdpipe.ml.data.condense import DMSettings

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "condensed.yaml"
DM = DMSettings(per_class=1)  # kdpipe condense's defaults (its command shares them: tests/unit/test_condense.py)
EPOCH_IMAGES = 2000  # transfer_repeats = EPOCH_IMAGES / (N x classes): the same epoch length for every N
WHOLE_SET = {"scratch": 0.9320, "kd": 0.9335}  # configs/fashion-mnist.yaml, seed 0 (README, "Accuracy benchmark")


def kdpipe(*args: str) -> str:
    """Run the kdpipe CLI of this interpreter's environment; its output, or exit with its error."""
    cmd = [sys.executable, "-m", "kdpipe.cli", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if done.returncode != 0:
        sys.exit(f"{' '.join(args[:1])} failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def make_set(folder: Path, per_class: int, seed: int, dm: dict[str, float] | None) -> float:
    """``kdpipe condense`` into ``folder`` unless a set made with the same settings is there; seconds it took."""
    settings = {"per_class": per_class, "seed": seed, "iterations": 0, **(dm or {})}
    prov_file = folder / "provenance.json"
    if prov_file.is_file():
        prov = json.loads(prov_file.read_text())
        if all(prov["settings"].get(k) == v for k, v in settings.items()):
            return float(prov["seconds"])
    args = ["--per-class", str(per_class), "--seed", str(seed), "--iterations", str(settings["iterations"])]
    for key in ("width", "real_batch", "lr"):
        if dm and key in dm:
            args += [f"--{key.replace('_', '-')}", str(dm[key])]
    kdpipe("condense", "-c", str(CONFIG), "-o", str(folder), "--force", "--no-progress", *args)
    return float(json.loads(prov_file.read_text())["seconds"])


def train(
    work: Path, name: str, folder: Path, per_class: int, classes: int, method: str, extra: list[str]
) -> dict[str, float]:
    """``kdpipe run --until distill`` on one transfer set; the selected student's val and test top-1."""
    repeats = max(1, round(EPOCH_IMAGES / (per_class * classes)))
    sets = [
        f"cache_dir={work / 'cache'}",
        f"output_dir={work / 'out' / name}",
        f"data.transfer_set={folder}",
        f"data.transfer_repeats={repeats}",
        f"distill.method={method}",
        "distill.compare=[]",
        *extra,
    ]
    kdpipe("run", "-c", str(CONFIG), "--until", "distill", "--no-progress", *[a for s in sets for a in ("--set", s)])
    record = json.loads((work / "cache" / "last_run.json").read_text())
    entry = work / "cache" / "distill" / record["stages"]["distill"]["key"]
    metrics = json.loads((entry / "metrics.json").read_text())
    seconds = sum(h["seconds"] for h in metrics["history"])  # the training epochs' time (also when cached)
    return {"val": metrics["best_val_top1"], "seconds": seconds, **test_top1(entry, extra)}


def test_top1(entry: Path, extra: list[str]) -> dict[str, float]:
    """The distill stage's deployed student (rebuilt from its spec alone) on Fashion-MNIST's test split."""
    import torch

    from kdpipe.config import load_config
    from kdpipe.ml.data.memory import load_dataset
    from kdpipe.ml.train.training import accuracy, predict
    from kdpipe.stages.distillers import load_student

    torch.set_num_threads(1)
    data = load_dataset(load_config(CONFIG, extra))
    model, _ = load_student(entry)
    return {"test": accuracy(predict(model, data.test_x, data.mean, data.std, 500, torch.device("cpu")), data.test_y)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-class", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="Random subsets' seeds.")
    parser.add_argument(
        "--iterations",
        type=int,
        nargs="+",
        default=[DM.iterations],
        help="DM iterations: one for every N, or one per N.",
    )
    parser.add_argument("--method", choices=["scratch", "kd"], default="scratch", help="How every set is trained.")
    parser.add_argument("--width", type=int, default=DM.width, help="Width of DM's random ConvNets.")
    parser.add_argument(
        "--real-batch", type=int, default=DM.real_batch, help="DM's real images per class per iteration."
    )
    parser.add_argument("--lr", type=float, default=DM.lr, help="DM's learning rate of the pixels.")
    parser.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE", type=key_value,
                        help="Also override this in every training run (e.g. distill.train.epochs=20).")  # fmt: skip
    parser.add_argument("--work", type=Path, help="Where sets and runs are kept.")
    args = parser.parse_args()
    extra = [f"{key}={value}" for key, value in args.extra]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    work = (args.work or cache / "kdpipe" / "condensed").resolve()
    if len(args.iterations) not in (1, len(args.per_class)):
        parser.error("--iterations: one value, or one per --per-class value")
    iterations = {n: args.iterations[min(i, len(args.iterations) - 1)] for i, n in enumerate(args.per_class)}
    classes = 10
    rows: list[tuple[str, ...]] = []
    top: dict[tuple[str, int], float] = {}
    started = time.perf_counter()
    for n in args.per_class:
        dm = {"iterations": iterations[n], "width": args.width, "real_batch": args.real_batch, "lr": args.lr}
        seconds = make_set(work / f"dm-{n}", n, 0, dm)
        found = train(work, f"dm-{n}", work / f"dm-{n}", n, classes, args.method, extra)
        top[("dm", n)] = found["test"]
        name = f"condensed-{n} (DM, {iterations[n]} iterations: {seconds:.0f} s)"
        rows.append((name, str(n * classes), f"{100 * found['val']:.2f}", f"{100 * found['test']:.2f}", "1",
                     f"{found['seconds']:.0f}"))  # fmt: skip
        vals, tests, took = [], [], []
        for seed in args.seeds:
            make_set(work / f"random-{n}" / f"s{seed}", n, seed, None)
            folder = work / f"random-{n}" / f"s{seed}"
            found = train(work, f"random-{n}-s{seed}", folder, n, classes, args.method, extra)
            vals.append(found["val"])
            tests.append(found["test"])
            took.append(found["seconds"])
        top[("random", n)] = statistics.mean(tests)
        spread = f" ± {100 * statistics.stdev(tests):.2f}" if len(tests) > 1 else ""
        rows.append((f"random-{n} (mean of seeds {' '.join(map(str, args.seeds))})", str(n * classes),
                     f"{100 * statistics.mean(vals):.2f}", f"{100 * top[('random', n)]:.2f}{spread}",
                     str(len(args.seeds)), f"{statistics.mean(took):.0f}"))  # fmt: skip
    whole = "whole training split (configs/fashion-mnist.yaml: crop/flip, 30 epochs; README)"
    rows.append((whole, "54000", "", f"{100 * WHOLE_SET[args.method]:.2f}", "1", ""))
    took = time.perf_counter() - started
    how = "labels only" if args.method == "scratch" else "KD from the shipped wrn_16_2 teacher"
    print(f"Fashion-MNIST, resnet8 student trained with DSA on each set ({how}); {took / 60:.1f} min in all")
    print("| training images | images | val top-1 % | test top-1 % | runs | training s |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    for n in sorted(args.per_class, key=lambda n: n == 10):  # the figure (10 per class) last
        print(f"condensed-{n} vs random-{n} = {100 * (top[('dm', n)] - top[('random', n)]):+.2f} pp")
    return 0


if __name__ == "__main__":
    sys.exit(main())
