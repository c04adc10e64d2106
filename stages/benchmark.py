"""benchmark: ONNX Runtime latency of every exported model over batch sizes × threads × providers.

The measuring is done by ``kdpipe/edge/runner.py``, the same single-file runner an edge bundle
carries, in one child process per model (a fair peak-RSS figure each, no torch thread pools in the
way). PyTorch eager latency of teacher and student is measured beside it as a reference.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from kdpipe.edge import RUNNER
from kdpipe.errors import StageError, UsageError
from kdpipe.stages.base import STAGES, Stage, StageContext, read_metrics


def providers_to_measure(requested: list[str]) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if requested == ["available"]:
        return available
    missing = [p for p in requested if p not in available]
    if missing:
        names = ", ".join(available)
        raise UsageError(f"benchmark.providers: '{missing[0]}' is not available here; available: {names}")
    return list(requested)


def run_runner(spec: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Run the edge runner on ``spec`` (written into ``folder``) and return its JSON."""
    spec_path, out_path = folder / "spec.json", folder / "results.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    proc = subprocess.run(
        [sys.executable, str(RUNNER), str(spec_path), "--out", str(out_path), "--quiet"],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no message"])[-1].removeprefix("edge_runner: error: ")
        if proc.returncode == 2:
            raise UsageError(last)
        raise StageError("benchmark", f"the runner exited {proc.returncode}: {last}")
    return json.loads(out_path.read_text())


def computed_precisions(models: dict[str, str], providers: list[str]) -> dict[str, dict[str, Any]]:
    """{model: {provider: what ORT computes it in there}} read from each provider's optimized graph."""
    from kdpipe.exporters.precision import safe_precision

    return {name: {p: safe_precision(Path(path), p) for p in providers} for name, path in models.items()}


def pytorch_latency(ctx: StageContext, batch_sizes: list[int], threads: int) -> dict[str, dict[str, Any]]:
    """Eager PyTorch latency of teacher and student (same timing rules as the ONNX cells, one round)."""
    import torch

    from kdpipe.edge.latency import measure_session, summarize
    from kdpipe.stages.distillers import load_student

    conf = ctx.cfg.config.benchmark
    torch.set_num_threads(threads)
    teacher, teachers = ctx.teacher_model()  # several teachers: their ensemble (what the student replaces)
    tspec = teachers[0][2]
    student, _ = load_student(ctx.inputs["distill"])
    out: dict[str, dict[str, Any]] = {}
    for name, model in (("teacher", teacher), ("student", student)):
        out[name] = {}
        for bs in batch_sizes:
            x = torch.randn(bs, *tspec["input_shape"], generator=torch.Generator().manual_seed(0))
            with torch.inference_mode():
                lat = measure_session(lambda m=model, x=x: m(x), conf.warmup, conf.min_runs, conf.min_seconds,
                                      conf.max_seconds)  # fmt: skip
            out[name][f"batch_{bs}"] = {**summarize(lat, bs), "threads": threads}
    return out


@STAGES.register()
class BenchmarkStage(Stage):
    name = "benchmark"
    version = 3
    needs = ("export", "teacher", "distill")
    libraries = ("onnxruntime", "torch")

    def run(self, ctx: StageContext) -> dict[str, Any]:
        conf = ctx.cfg.config.benchmark
        export_dir = ctx.inputs["export"]
        exported = read_metrics(export_dir)
        providers = providers_to_measure(list(conf.providers))
        spec = {
            "models": {name: str(export_dir / info["file"]) for name, info in exported["models"].items()},
            "input_shape": exported["input_shape"],
            "batch_sizes": list(conf.batch_sizes),
            "threads": list(conf.intra_op_threads),
            "providers": providers,
            "warmup": conf.warmup,
            "min_runs": conf.min_runs,
            "min_seconds": conf.min_seconds,
            "max_seconds": conf.max_seconds,
            "rounds": conf.rounds,
            "seed": 0,
        }
        ctx.log(f"benchmark: {len(spec['models'])} models × {len(providers)} providers × "
                f"{len(conf.intra_op_threads)} thread counts × {len(conf.batch_sizes)} batch sizes")  # fmt: skip
        raw = run_runner(spec, ctx.work_dir)
        headline_provider, headline_threads = providers[0], conf.intra_op_threads[0]
        results: dict[str, dict[str, Any]] = {name: {} for name in exported["models"]}
        matrix: dict[str, list[dict[str, Any]]] = {name: [] for name in exported["models"]}
        for cell in raw["results"]:
            entry = {k: v for k, v in cell.items() if k not in ("model", "file")}
            matrix[cell["model"]].append(entry)
            if cell["provider"] == headline_provider and cell["threads"] == headline_threads:
                results[cell["model"]][f"batch_{cell['batch_size']}"] = entry
        for name, cells in results.items():
            for batch, cell in cells.items():
                ctx.log(f"benchmark {name} {batch}: p50 {cell['p50_ms']:.3f} ms, p90 {cell['p90_ms']:.3f} ms")
        precision = computed_precisions(spec["models"], providers)
        for name, by_provider in precision.items():
            computes = (by_provider.get(headline_provider) or {}).get("computes_in")
            if name.endswith("-fp16") and computes == "fp32":
                ctx.log(f"benchmark {name}: {headline_provider} computes it in fp32 (fp16 weights upcast), "
                        "so it is no faster than the fp32 student")  # fmt: skip
        speedup = {}
        if "teacher" in results and "student" in results:
            speedup = {b: results["teacher"][b]["p50_ms"] / results["student"][b]["p50_ms"] for b in results["student"]}
        return {
            "providers": providers,
            "intra_op_threads": headline_threads,
            "thread_counts": list(conf.intra_op_threads),
            "host": raw.get("host"),
            "results": results,
            "matrix": matrix,
            "speedup_p50": speedup,
            "precision": precision,
            "pytorch": pytorch_latency(ctx, list(conf.batch_sizes), headline_threads) if conf.pytorch_reference else {},
        }
