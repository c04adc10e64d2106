"""benchmark: ONNX Runtime latency and throughput of every exported model. Needs no torch."""

from __future__ import annotations

from typing import Any

from pipeline.latency import benchmark_models
from stages.base import STAGES, Stage, StageContext, read_metrics


@STAGES.register("benchmark")
class BenchmarkStage(Stage):
    name = "benchmark"
    version = 1
    needs = ("export",)
    libraries = ("onnxruntime",)

    def run(self, ctx: StageContext) -> dict[str, Any]:
        conf = ctx.cfg.config.benchmark
        exported = read_metrics(ctx.inputs["export"])
        shape = tuple(exported["input_shape"])
        results = benchmark_models(
            {name: ctx.inputs["export"] / info["file"] for name, info in exported["models"].items()},
            shape,
            list(conf.batch_sizes),
            list(conf.providers),
            conf.intra_op_threads,
            conf.warmup,
            conf.min_runs,
            conf.min_seconds,
            conf.max_seconds,
            rounds=conf.rounds,
            log=ctx.log,
        )
        speedup = {}
        if "teacher" in results and "student" in results:
            speedup = {b: results["teacher"][b]["p50_ms"] / results["student"][b]["p50_ms"] for b in results["student"]}
        return {
            "providers": list(conf.providers),
            "intra_op_threads": conf.intra_op_threads,
            "results": results,
            "speedup_p50": speedup,
        }
