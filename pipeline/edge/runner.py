"""Stand-alone ONNX Runtime latency benchmark for an edge bundle.

Needs only Python >= 3.8, numpy and onnxruntime (``pip install onnxruntime numpy``); it imports nothing from kdpipe.
Run it next to its spec::

    python edge_runner.py SPEC.json [--out results.json] [--no-isolate] [--quiet]

SPEC.json names the models (paths relative to the spec's folder), ``input_shape`` without the batch axis and the grid
``batch_sizes`` x ``threads`` x ``providers``, plus timing settings (``warmup``, ``min_runs``, ``min_seconds``,
``max_seconds``, ``rounds``, ``seed``) and optionally ``samples``: an .npz with ``images`` and ``expected_<model>``
logits, checked on the CPU provider as a parity test on the device.

A model with a tuned session beside it (``MODEL.session.json``, written by ``kdpipe bundle``: intra/inter-op
threads, graph optimisation level, execution mode) is opened with those settings everywhere, its cells measured
at the tuned thread count instead of the spec's ``threads`` grid; each result says which ``session`` it ran with.

Each (model, provider, threads) cell is measured in a child process (this file re-run with a hidden ``--cell``), so
that every model gets its own peak-RSS figure; ``--no-isolate`` measures everything in this process instead.
Results go to ``--out`` (or stdout) as JSON, schema ``kdpipe.bench/1``; a short table goes to stderr unless
``--quiet``. Exit codes: 0 ok, 1 a measuring child crashed, 2 bad input, 3 numpy/onnxruntime missing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SCHEMA = "kdpipe.bench/1"
DEFAULTS: dict[str, Any] = {
    "batch_sizes": [1], "threads": [1], "providers": ["CPUExecutionProvider"], "warmup": 10, "min_runs": 50,
    "min_seconds": 1.0, "max_seconds": 20.0, "rounds": 10, "seed": 0, "samples": None,
}  # fmt: skip
TIMING_KEYS = ("warmup", "min_runs", "min_seconds", "max_seconds", "rounds", "seed")
PARITY_BATCH = 64
SESSION_SUFFIX = ".session.json"
LEVELS = ("ORT_DISABLE_ALL", "ORT_ENABLE_BASIC", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL")
MODES = ("ORT_SEQUENTIAL", "ORT_PARALLEL")


class SpecError(Exception):
    """Bad input (spec, model file, provider): reported on one line with exit code 2."""


def peak_rss_mb() -> float | None:
    """Peak resident memory of this process in MiB (None where it cannot be read, e.g. Windows).

    On Linux this reads ``VmHWM``: ``ru_maxrss`` survives ``exec``, so a child spawned by a big parent would report
    the parent's peak, not its own. Elsewhere ``ru_maxrss`` is used (KiB on Linux, bytes on macOS).
    """
    try:
        with open("/proc/self/status", encoding="utf-8", errors="replace") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2.0**20 if sys.platform == "darwin" else peak / 1024.0


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo, macOS sysctl), else platform.processor() or the machine type."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            for line in info:
                if line.split(":")[0].strip() in ("model name", "Hardware", "cpu model"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            out = subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=5
            )
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine()


def session_path(model_path: str) -> str:
    """Where a model's tuned session settings live: beside it, ``NAME.session.json`` for ``NAME.onnx``."""
    base = model_path[: -len(".onnx")] if model_path.endswith(".onnx") else model_path
    return base + SESSION_SUFFIX


def load_session(model_path: str) -> dict[str, Any] | None:
    """The tuned session settings beside ``model_path``, validated; None when there are none."""
    path = session_path(model_path)
    if not os.path.isfile(path):
        return None
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise SpecError(f"cannot read session settings {path}: {exc}") from None
    checks = {
        "intra_op_num_threads": lambda v: type(v) is int and v >= 1,
        "inter_op_num_threads": lambda v: type(v) is int and v >= 1,
        "graph_optimization_level": lambda v: v in LEVELS,
        "execution_mode": lambda v: v in MODES,
    }
    if not isinstance(raw, dict):
        raise SpecError(f"session settings {path}: expected a JSON object")
    for key, ok in checks.items():
        if key not in raw or not ok(raw[key]):
            raise SpecError(f"session settings {path}: '{key}' is missing or invalid: {raw.get(key)!r}")
    return {key: raw[key] for key in checks}


def open_session(path: str, provider: str, threads: int, session: dict[str, Any] | None = None) -> Any:
    """An InferenceSession with the benchmark's options, or ``session``'s tuned ones; an unloadable file is bad
    input."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if session:
        options.intra_op_num_threads = session["intra_op_num_threads"]
        options.inter_op_num_threads = session["inter_op_num_threads"]
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, session["graph_optimization_level"])
        options.execution_mode = getattr(ort.ExecutionMode, session["execution_mode"])
    try:
        session = ort.InferenceSession(path, sess_options=options, providers=[provider])
    except Exception as exc:  # onnxruntime raises its own pybind exception types
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise SpecError(f"{path}: cannot load as an ONNX model: {detail}") from None
    if session.get_providers()[0] != provider:  # onnxruntime falls back to CPU when a provider fails to start
        raise SpecError(f"{provider} could not be initialised for {path}; the session got {session.get_providers()}")
    if len(session.get_inputs()) != 1:
        raise SpecError(f"{path}: the model has {len(session.get_inputs())} inputs; the runner feeds exactly one")
    return session


def time_calls(session: Any, feed: dict[str, Any], min_calls: int, min_seconds: float, max_seconds: float) -> list[int]:
    """Per-call ns of ``session.run(None, feed)`` until >= min_calls and >= min_seconds, capped at max_seconds."""
    run = session.run
    clock = time.perf_counter_ns
    min_ns, max_ns = int(min_seconds * 1e9), int(max_seconds * 1e9)
    latencies: list[int] = []
    started = clock()
    while True:
        t0 = clock()
        run(None, feed)
        t1 = clock()
        latencies.append(t1 - t0)
        if t1 - started >= max_ns or (len(latencies) >= min_calls and t1 - started >= min_ns):
            return latencies


def summarize(latencies_ms: Sequence[float], batch_size: int) -> dict[str, Any]:
    """Mean, population std, min/max and linear-interpolated percentiles; throughput in images per second."""
    import numpy as np

    if len(latencies_ms) == 0:
        raise ValueError("summarize needs at least one latency")
    values = np.asarray(latencies_ms, dtype=np.float64)
    p50, p90, p95, p99 = (float(p) for p in np.percentile(values, [50, 90, 95, 99]))
    mean = float(values.mean())
    return {
        "runs": int(values.size), "mean_ms": mean, "std_ms": float(values.std()), "min_ms": float(values.min()),
        "p50_ms": p50, "p90_ms": p90, "p95_ms": p95, "p99_ms": p99, "max_ms": float(values.max()),
        "throughput_ips": batch_size * 1000.0 / mean if mean > 0 else float("inf"),
    }  # fmt: skip


def measure_cell(
    path: str,
    input_shape: Sequence[int],
    batch_sizes: Sequence[int],
    provider: str = "CPUExecutionProvider",
    threads: int = 1,
    model: str | None = None,
    file: str | None = None,
    warmup: int = 10,
    min_runs: int = 50,
    min_seconds: float = 1.0,
    max_seconds: float = 20.0,
    rounds: int = 10,
    seed: int = 0,
    session: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Benchmark one model on one provider and thread count, in this process: one result dict per batch size.

    ``peak_rss_mb`` is this process's peak so far, read after each batch size (so it only grows along
    ``batch_sizes``); it covers one model only when the process measured nothing else, as a ``--cell`` child does.

    Raises:
        SpecError: the file cannot be loaded, the provider does not start, or the model's batch axis is fixed to
            another size.
    """
    import numpy as np

    t0 = time.perf_counter_ns()
    if session:
        threads = session["intra_op_num_threads"]
    settings = session
    session = open_session(path, provider, threads, settings)
    create_ms = (time.perf_counter_ns() - t0) / 1e6
    spec_input = session.get_inputs()[0]
    rounds = max(1, rounds)
    calls_per_round = max(1, -(-min_runs // rounds))
    results = []
    for bs in batch_sizes:
        if isinstance(spec_input.shape[0], int) and spec_input.shape[0] not in (bs, -1, 0):
            raise SpecError(f"{path}: the batch axis is fixed to {spec_input.shape[0]}; batch size {bs} was asked for")
        data = np.random.default_rng(seed).standard_normal((bs, *input_shape), dtype=np.float32)
        feed = {spec_input.name: data}
        t0 = time.perf_counter_ns()
        session.run(None, feed)
        first_ms = (time.perf_counter_ns() - t0) / 1e6
        for _ in range(max(0, warmup)):
            session.run(None, feed)
        all_ns: list[int] = []
        round_p50: list[float] = []
        for _ in range(rounds):
            lat = time_calls(session, feed, calls_per_round, min_seconds / rounds, max_seconds / rounds)
            all_ns += lat
            round_p50.append(float(np.median(lat)) / 1e6)
        result: dict[str, Any] = {
            "model": model if model is not None else Path(path).stem, "file": file if file is not None else path,
            "provider": provider, "threads": threads, "batch_size": bs, "session_create_ms": create_ms,
            "first_run_ms": first_ms,
        }  # fmt: skip
        result.update(summarize([ns / 1e6 for ns in all_ns], bs))
        result.update({"rounds": rounds, "round_p50_ms": round_p50, "peak_rss_mb": peak_rss_mb(), "session": settings})
        results.append(result)
    return results


def load_spec(spec_path: Path) -> dict[str, Any]:
    """Read and validate SPEC.json; model and sample paths come back absolute."""
    try:
        raw = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise SpecError(f"cannot read spec {spec_path}: {exc}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"spec {spec_path}: expected a JSON object")
    unknown = sorted(set(raw) - set(DEFAULTS) - {"models", "input_shape"})
    if unknown:
        raise SpecError(f"spec {spec_path}: unknown key(s): {', '.join(unknown)}")
    spec = dict(DEFAULTS, **raw)

    def ints(key: str, low: int, many: bool) -> None:
        value = spec[key] if many else [spec[key]]
        if not (isinstance(value, list) and value and all(type(v) is int and v >= low for v in value)):
            what = f"a non-empty list of integers >= {low}" if many else f"an integer >= {low}"
            raise SpecError(f"spec {spec_path}: '{key}' must be {what}, got {spec[key]!r}")

    if not (isinstance(spec.get("models"), dict) and spec["models"]):
        raise SpecError(f"spec {spec_path}: 'models' must be a non-empty object of name -> .onnx path")
    for key in ("input_shape", "batch_sizes", "threads"):
        ints(key, 1, True)
    for key, low in (("warmup", 0), ("min_runs", 1), ("rounds", 1), ("seed", 0)):
        ints(key, low, False)
    for key in ("min_seconds", "max_seconds"):
        if type(spec[key]) not in (int, float) or spec[key] < 0:
            raise SpecError(f"spec {spec_path}: '{key}' must be a number >= 0, got {spec[key]!r}")
    if not (
        isinstance(spec["providers"], list) and spec["providers"] and all(isinstance(p, str) for p in spec["providers"])
    ):
        raise SpecError(f"spec {spec_path}: 'providers' must be a non-empty list of provider names")
    base = Path(spec_path).resolve().parent
    spec["files"] = dict(spec["models"])
    spec["models"] = {name: str(base / str(rel)) for name, rel in spec["models"].items()}
    for name, path in spec["models"].items():
        if not os.path.isfile(path):
            raise SpecError(f"model '{name}': file not found: {path}")
    spec["sessions"] = {name: s for name, s in ((n, load_session(p)) for n, p in spec["models"].items()) if s}
    if spec["samples"] is not None:
        spec["samples"] = str(base / str(spec["samples"]))
        if not os.path.isfile(spec["samples"]):
            raise SpecError(f"samples file not found: {spec['samples']}")
    return spec


def sample_outputs(path: str, images: Any) -> Any:
    """A model's outputs on the sample images: CPU provider, one thread, default session options, batches of
    PARITY_BATCH. kdpipe's export stage computes the expected outputs with this very function, so a build that
    matches gives identical figures. Nothing here follows the spec's threads or a tuned session: another thread
    count or optimisation level changes the float sums' order (a last-bit difference), and dynamic int8
    quantisation depends on the batch."""
    import numpy as np

    session = open_session(path, "CPUExecutionProvider", 1)
    feed_name = session.get_inputs()[0].name
    images = np.ascontiguousarray(images, dtype=np.float32)
    outputs = [
        session.run(None, {feed_name: images[i : i + PARITY_BATCH]})[0] for i in range(0, len(images), PARITY_BATCH)
    ]
    return np.concatenate(outputs).astype(np.float32) if outputs else np.zeros((0,), np.float32)


def check_samples(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Run the sample images through each model that has ``expected_<model>`` logits, as ``sample_outputs`` does."""
    import numpy as np

    try:
        with np.load(spec["samples"]) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except Exception as exc:  # zipfile/pickle/format errors all mean an unusable file
        raise SpecError(f"cannot read samples {spec['samples']}: {exc}") from None
    if "images" not in arrays:
        raise SpecError(f"samples {spec['samples']}: no 'images' array")
    images = arrays["images"].astype(np.float32, copy=False)
    if tuple(images.shape[1:]) != tuple(spec["input_shape"]):
        raise SpecError(
            f"samples: images have shape {images.shape}, expected (N, {', '.join(map(str, spec['input_shape']))})"
        )
    report = {}
    for name, path in spec["models"].items():
        expected = arrays.get(f"expected_{name}")
        if expected is None:
            continue
        got = sample_outputs(path, images)
        if got.shape != expected.shape:
            raise SpecError(f"samples: expected_{name} has shape {expected.shape}, the model gives {got.shape}")
        n = len(images)
        report[name] = {
            "samples": n,
            "max_abs_diff": float(np.abs(got - expected).max()) if got.size else 0.0,
            "top1_agreement": float((got.argmax(-1) == expected.argmax(-1)).mean()) if n else 1.0,
        }
    return report


def run_isolated(cell: dict[str, Any]) -> list[dict[str, Any]]:
    """Measure one cell in a fresh interpreter running this file; its errors come back as SpecError or RuntimeError."""
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--cell", json.dumps(cell)], capture_output=True, text=True
    )
    err_lines = [line for line in proc.stderr.splitlines() if line.strip()]
    if proc.returncode == 2 and err_lines and err_lines[-1].startswith("edge_runner: error: "):
        raise SpecError(err_lines[-1][len("edge_runner: error: ") :])
    out_lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode != 0 or not out_lines:
        tail = err_lines[-1] if err_lines else "no output"
        raise RuntimeError(
            f"measuring {cell['model']} ({cell['provider']}, {cell['threads']} threads) failed "
            f"with exit code {proc.returncode}: {tail}"
        )
    return json.loads(out_lines[-1])


def run_spec(spec_path: Path, isolate: bool = True) -> dict[str, Any]:
    """Run every cell of the spec and the samples check; returns the ``kdpipe.bench/1`` document."""
    import numpy as np
    import onnxruntime as ort

    spec = load_spec(spec_path)
    available = ort.get_available_providers()
    for provider in spec["providers"]:
        if provider not in available:
            raise SpecError(f"provider '{provider}' is not available here; available: {', '.join(available)}")
    settings = {key: spec[key] for key in TIMING_KEYS}
    results: list[dict[str, Any]] = []
    for name, path in spec["models"].items():
        session = spec["sessions"].get(name)
        for provider in spec["providers"]:
            for threads in [session["intra_op_num_threads"]] if session else spec["threads"]:
                cell = dict(settings, path=path, input_shape=spec["input_shape"], batch_sizes=spec["batch_sizes"],
                            provider=provider, threads=threads, model=name, file=spec["files"][name],
                            session=session)  # fmt: skip
                results += run_isolated(cell) if isolate else measure_cell(**cell)
    host = {
        "hostname": platform.node(), "platform": platform.platform(), "machine": platform.machine(),
        "python": platform.python_version(), "onnxruntime": ort.__version__, "numpy": np.__version__,
        "cpu_count": os.cpu_count(), "cpu": cpu_name(),
    }  # fmt: skip
    samples = check_samples(spec) if spec["samples"] else {}
    return {"schema": SCHEMA, "host": host, "providers_available": available, "settings": settings,
            "results": results, "samples_check": samples}  # fmt: skip


def format_table(doc: dict[str, Any]) -> str:
    """A short human-readable table of the results and the samples check."""
    lines = [
        f"{'model':<14} {'provider':<26} {'thr':>3} {'batch':>5} {'p50 ms':>9} {'p90 ms':>9} {'img/s':>10} {'MiB':>7}"
    ]
    for r in doc["results"]:
        rss = "-" if r["peak_rss_mb"] is None else f"{r['peak_rss_mb']:.0f}"
        lines.append(
            f"{r['model']:<14} {r['provider']:<26} {r['threads']:>3} {r['batch_size']:>5} "
            f"{r['p50_ms']:>9.3f} {r['p90_ms']:>9.3f} {r['throughput_ips']:>10.1f} {rss:>7}"
        )
    for name, check in doc["samples_check"].items():
        lines.append(
            f"samples {name}: n={check['samples']} max|diff|={check['max_abs_diff']:.2e} "
            f"top-1 agreement={check['top1_agreement']:.4f}"
        )
    return "\n".join(lines)


def _fail(message: str, code: int) -> int:
    print(f"edge_runner: error: {message}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    parser = argparse.ArgumentParser(prog="edge_runner", description="Benchmark ONNX models with onnxruntime.")
    parser.add_argument("spec", nargs="?", help="benchmark spec (JSON)")
    parser.add_argument("--out", help="write the results JSON here instead of stdout")
    parser.add_argument("--no-isolate", action="store_true", help="measure in this process, not one child per cell")
    parser.add_argument("--quiet", action="store_true", help="no table on stderr")
    parser.add_argument("--cell", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for module in ("numpy", "onnxruntime"):
        try:
            __import__(module)
        except ImportError:
            return _fail(f"{module} is not installed here: pip install onnxruntime numpy", 3)
    try:
        if args.cell is not None:
            print(json.dumps(measure_cell(**json.loads(args.cell))))
            return 0
        if args.spec is None:
            parser.error("the spec file is required")
        doc = run_spec(Path(args.spec), isolate=not args.no_isolate)
        text = json.dumps(doc, indent=2)
        if args.out:
            Path(args.out).write_text(text + "\n", encoding="utf-8")
        else:
            print(text)
    except (SpecError, OSError) as exc:  # OSError: --out cannot be written
        return _fail(str(exc), 2)
    except RuntimeError as exc:
        return _fail(str(exc), 1)
    if not args.quiet:
        print(format_table(doc), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
