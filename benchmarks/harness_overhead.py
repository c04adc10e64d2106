"""How much does kdpipe's benchmark harness add to the latency it reports, versus a bare timing loop?

Exports a small CNN (the zoo's ``resnet8`` when ``kdpipe`` imports, else a 3-conv net) for 1x28x28 inputs to ONNX in
a temp dir, then compares, in one process and on the same file, two figures for the same model, input and session
options (batch size 1, 1 intra-op and 1 inter-op thread, all graph optimisations):

bare     a fresh session, the runner's untimed first run plus ``--warmup`` runs, then ``--calls`` timed calls of
         ``t0 = perf_counter_ns(); sess.run(None, feed); lat.append(...)``; the figure is their p50;
harness  the p50 that ``kdpipe.edge.runner.measure_cell`` (what the benchmark stage runs in each cell) reports for
         exactly ``--calls`` timed calls in ``--harness-rounds`` rounds, with the same warmup: its own session, its
         own input, its own loop and bookkeeping.

On a shared machine a single pair of figures swings by tens of percent (another process takes the core for a second),
so the figure is built to hold still:

* threads are pinned to 1 (OMP/MKL/OpenBLAS, torch and the sessions); one untimed pair warms the process up, and
  the objects alive then are frozen out of the garbage collector, which runs (cheaply) before every measurement;
* the measurements are interleaved in ``--rounds`` rounds; within a round each side is measured ``--k`` times in
  alternating order (bare, harness, harness, bare, ...; the next round starts with the other side), and a side's
  figure for the round is the minimum of its ``k`` p50s: load from elsewhere only ever adds time, so the minimum is
  the least disturbed figure and both sides had the same chances at it;
* each round gives one ratio harness/bare, measured seconds apart under the same load; the result is the median of
  the round ratios with a seeded bootstrap 95% interval (resampling rounds).

The last line printed is ``overhead p50 = X.X% (95% CI a..b)``, in percent of the bare p50.

    python benchmarks/harness_overhead.py [--rounds 41] [--k 5] [--calls 200] [--warmup 50] [--harness-rounds 10]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):  # before numpy and torch load
    os.environ[_var] = "1"

import argparse  # noqa: E402
import gc  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from kdpipe.edge.runner import measure_cell  # noqa: E402

INPUT_SHAPE = (1, 28, 28)


def small_cnn() -> tuple[str, nn.Module]:
    """The zoo's resnet8 when kdpipe's model zoo is importable, else a plain 3-conv net."""
    torch.manual_seed(0)
    try:
        from kdpipe.ml.models.zoo import create_model

        return "resnet8", create_model("resnet8", 10, 1).eval()
    except ImportError:
        net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(64, 10),
        )  # fmt: skip
        return "3-conv CNN", net.eval()


def export(model: nn.Module, path: Path) -> None:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (torch.randn(2, *INPUT_SHAPE),), str(path), dynamo=False, opset_version=17,
            input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )  # fmt: skip


def bare_p50(path: Path, calls: int, warmup: int) -> float:
    """p50 (ms) of a bare loop, with the session options and input the runner uses."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: np.random.default_rng(0).standard_normal((1, *INPUT_SHAPE), dtype=np.float32)}
    for _ in range(1 + warmup):  # the runner's untimed first run plus its warmup
        sess.run(None, feed)
    lat: list[int] = []
    for _ in range(calls):
        t0 = time.perf_counter_ns()
        sess.run(None, feed)
        lat.append(time.perf_counter_ns() - t0)
    return float(np.percentile(lat, 50)) / 1e6


def harness_p50(path: Path, calls: int, warmup: int, rounds: int) -> float:
    """p50 (ms) reported by the runner's measure_cell for exactly ``calls`` timed calls."""
    (result,) = measure_cell(
        str(path), INPUT_SHAPE, [1], "CPUExecutionProvider", threads=1, warmup=warmup, min_runs=calls,
        min_seconds=0.0, max_seconds=1e9, rounds=rounds, seed=0,
    )  # fmt: skip
    assert result["runs"] == calls, result["runs"]
    return result["p50_ms"]


def one_round(index: int, k: int, measure: dict[str, Callable[[], float]]) -> dict[str, list[float]]:
    """``k`` p50s per side, in alternating order; round ``index`` starts with bare when even, harness when odd."""
    order = ["bare", "harness"] if index % 2 == 0 else ["harness", "bare"]
    figures: dict[str, list[float]] = {"bare": [], "harness": []}
    for j in range(k):
        for side in order if j % 2 == 0 else order[::-1]:
            gc.collect()  # the same clean start for both sides, outside any timing
            figures[side].append(measure[side]())
    return figures


def bootstrap_median(values: np.ndarray, resamples: int, seed: int) -> tuple[float, float]:
    """A seeded percentile-bootstrap 95% interval for the median of ``values``."""
    rng = np.random.default_rng(seed)
    medians = np.median(rng.choice(values, size=(resamples, values.size), replace=True), axis=1)
    low, high = np.percentile(medians, [2.5, 97.5])
    return float(low), float(high)


def pct(ratio: float) -> float:
    return round(100 * (ratio - 1), 1) + 0.0  # + 0.0: no "-0.0"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=41, help="interleaved rounds: one harness/bare ratio each")
    parser.add_argument("--k", type=int, default=5, help="measurements per side and round; the round keeps the min")
    parser.add_argument("--calls", type=int, default=200, help="timed calls per measurement")
    parser.add_argument("--warmup", type=int, default=50, help="untimed calls per measurement, after the first")
    parser.add_argument("--harness-rounds", type=int, default=10, help="measure_cell's rounds; must divide --calls")
    parser.add_argument("--resamples", type=int, default=10000, help="bootstrap resamples")
    parser.add_argument("--seed", type=int, default=0, help="the bootstrap's seed")
    args = parser.parse_args()
    if args.calls % args.harness_rounds:
        parser.error("--harness-rounds must divide --calls, so that both sides time the same number of calls")
    if args.rounds < 2 or args.k < 1:
        parser.error("--rounds must be at least 2 and --k at least 1")
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        name, model = small_cnn()
        path = Path(tmp) / "model.onnx"
        export(model, path)
        measure = {
            "bare": lambda: bare_p50(path, args.calls, args.warmup),
            "harness": lambda: harness_p50(path, args.calls, args.warmup, args.harness_rounds),
        }
        print(
            f"model: {name}, batch 1, 1 thread; {args.rounds} rounds x {args.k} measurements per side x "
            f"{args.calls} calls (warmup {args.warmup}); the round keeps each side's min p50"
        )
        one_round(0, 1, measure)  # warm-up pair, not counted: imports, allocator, caches
        gc.collect()
        gc.freeze()  # torch's many objects out of the collector's way: a collection between measurements is cheap
        bare, harness, ratios = [], [], []
        started = time.perf_counter()
        for i in range(args.rounds):
            figures = one_round(i, args.k, measure)
            bare.append(min(figures["bare"]))
            harness.append(min(figures["harness"]))
            ratios.append(harness[-1] / bare[-1])
            print(
                f"  round {i + 1:2d}: bare p50 {bare[-1]:.4f} ms, harness p50 {harness[-1]:.4f} ms, "
                f"ratio {ratios[-1]:.4f} (bare p50s {' '.join(f'{v:.4f}' for v in figures['bare'])}; "
                f"harness {' '.join(f'{v:.4f}' for v in figures['harness'])})"
            )
        seconds = time.perf_counter() - started

    r = np.asarray(ratios)
    low, high = bootstrap_median(r, args.resamples, args.seed)
    median = float(np.median(r))
    print(f"{args.rounds} rounds in {seconds:.0f} s")
    print(f"bare    p50 = {float(np.median(bare)):.4f} ms (median of round minima)")
    print(f"harness p50 = {float(np.median(harness)):.4f} ms (median of round minima)")
    print(f"ratio harness/bare per round: median {median:.4f}, min {r.min():.4f}, max {r.max():.4f}")
    print(f"overhead p50 = {pct(median):.1f}% (95% CI {pct(low):.1f}..{pct(high):.1f})")


if __name__ == "__main__":
    main()
