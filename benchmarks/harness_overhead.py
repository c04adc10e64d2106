"""How much does kdpipe's benchmark harness add to the latency it reports, versus a bare timing loop?

Exports a small CNN (the zoo's ``resnet8`` when ``pipeline`` imports, else a 3-conv net) for 1x28x28 inputs to ONNX in
a temp dir, then alternates, in one process and on the same file:

(a) a bare loop: ``t0 = perf_counter_ns(); sess.run(None, feed); lat.append(...)``, N calls;
(b) ``exporters/edge_runner.py``'s in-process :func:`measure_cell`, with the same session options, batch size 1,
    1 thread, warmup and number of calls.

The order flips every alternation (a,b then b,a) so that drift on the machine hits both alike. Each side's figure is
the median over alternations of its per-alternation p50. The last line printed is ``overhead p50 = X.X%``.

    python benchmarks/harness_overhead.py [--calls 2000] [--alternations 6] [--warmup 50] [--rounds 10]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kdpipe.edge.runner import measure_cell

INPUT_SHAPE = (1, 28, 28)


def small_cnn() -> tuple[str, nn.Module]:
    """The zoo's resnet8 when kdpipe's ``pipeline`` package is importable, else a plain 3-conv net."""
    torch.manual_seed(0)
    try:
        from kdpipe.ml.zoo import create_model

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000, help="timed calls per side and alternation")
    parser.add_argument("--alternations", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=10, help="the harness's rounds; must divide --calls")
    args = parser.parse_args()
    if args.calls % args.rounds:
        parser.error("--rounds must divide --calls, so that both sides time the same number of calls")
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        name, model = small_cnn()
        path = Path(tmp) / "model.onnx"
        export(model, path)
        print(f"model: {name}, batch 1, 1 thread, {args.calls} calls x {args.alternations} alternations")
        bare, harness = [], []
        for i in range(args.alternations):
            sides = [("bare", bare), ("harness", harness)]
            for side, values in sides if i % 2 == 0 else sides[::-1]:
                if side == "bare":
                    values.append(bare_p50(path, args.calls, args.warmup))
                else:
                    values.append(harness_p50(path, args.calls, args.warmup, args.rounds))
            print(f"  alternation {i + 1}: bare p50 {bare[-1]:.4f} ms, harness p50 {harness[-1]:.4f} ms")

    p50_bare, p50_harness = statistics.median(bare), statistics.median(harness)
    print(f"bare    p50 = {p50_bare:.4f} ms")
    print(f"harness p50 = {p50_harness:.4f} ms")
    print(f"ratio harness/bare = {p50_harness / p50_bare:.4f}")
    overhead = round(100 * (p50_harness / p50_bare - 1), 1) + 0.0  # + 0.0: no "-0.0%"
    print(f"overhead p50 = {overhead:.1f}%")


if __name__ == "__main__":
    main()
