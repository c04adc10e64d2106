"""Tests for kdpipe/edge/runner.py, the stand-alone benchmark runner shipped in edge bundles.

The runner is run as a subprocess (as on a device), on two tiny ONNX models exported here with torch; one test runs it
in a fresh virtual environment holding only numpy and onnxruntime.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from kdpipe.edge import runner as edge_runner
from tests.conftest import clean_env

RUNNER = Path(edge_runner.__file__).resolve()
INPUT_SHAPE = (1, 8, 8)
MODELS = {"student": 0, "teacher": 1}  # name -> torch seed
RESULT_KEYS = {
    "model", "file", "provider", "threads", "batch_size", "session_create_ms", "first_run_ms", "runs", "mean_ms",
    "std_ms", "min_ms", "p50_ms", "p90_ms", "p95_ms", "p99_ms", "max_ms", "throughput_ips", "rounds", "round_p50_ms",
    "peak_rss_mb", "session",
}  # fmt: skip
FAST = {"batch_sizes": [1, 3], "threads": [1], "warmup": 1, "min_runs": 4, "min_seconds": 0, "rounds": 2}


def tiny_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()


@pytest.fixture(scope="module")
def bundle_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with student.onnx, teacher.onnx and samples.npz (images plus each model's torch logits)."""
    out = tmp_path_factory.mktemp("edge_models")
    images = torch.randn(70, *INPUT_SHAPE, generator=torch.Generator().manual_seed(0))
    arrays = {"images": images.numpy()}
    for name, seed in MODELS.items():
        model = tiny_net(seed)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model, (images[:2],), str(out / f"{name}.onnx"), dynamo=False, opset_version=17,
                input_names=["input"], output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            )  # fmt: skip
            arrays[f"expected_{name}"] = model(images).numpy()
    np.savez(out / "samples.npz", **arrays)
    return out


@pytest.fixture
def bundle(bundle_src: Path, tmp_path: Path) -> Path:
    """A private copy of the models, so tests can add or break files."""
    dest = tmp_path / "bundle"
    shutil.copytree(bundle_src, dest)
    return dest


def write_spec(folder: Path, **changes: object) -> Path:
    spec = {
        "models": {name: f"{name}.onnx" for name in MODELS},
        "input_shape": list(INPUT_SHAPE),
        "providers": ["CPUExecutionProvider"],
        "samples": "samples.npz",
        **FAST,
        **changes,
    }
    path = folder / "spec.json"
    path.write_text(json.dumps(spec))
    return path


def run_runner(*args: str | Path, python: str = sys.executable, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [python, str(RUNNER), *map(str, args)], capture_output=True, text=True, timeout=timeout, env=clean_env()
    )


def check_document(doc: dict) -> None:
    """Shape and sanity of a full run on the FAST grid with the samples check."""
    assert doc["schema"] == "kdpipe.bench/1"
    assert set(doc["host"]) == {"hostname", "platform", "machine", "python", "onnxruntime", "numpy", "cpu_count", "cpu"}
    assert "CPUExecutionProvider" in doc["providers_available"]
    assert doc["settings"] == {
        "warmup": 1,
        "min_runs": 4,
        "min_seconds": 0,
        "max_seconds": 20.0,
        "rounds": 2,
        "seed": 0,
    }
    results = doc["results"]
    assert [(r["model"], r["batch_size"]) for r in results] == [
        ("student", 1), ("student", 3), ("teacher", 1), ("teacher", 3),
    ]  # fmt: skip
    for r in results:
        assert set(r) == RESULT_KEYS
        assert r["file"] == f"{r['model']}.onnx" and r["provider"] == "CPUExecutionProvider" and r["threads"] == 1
        assert r["runs"] >= 4
        assert r["min_ms"] <= r["p50_ms"] <= r["p90_ms"] <= r["p95_ms"] <= r["p99_ms"] <= r["max_ms"]
        assert r["rounds"] == 2 and len(r["round_p50_ms"]) == 2
        assert r["throughput_ips"] == pytest.approx(r["batch_size"] * 1000 / r["mean_ms"])
        assert r["session_create_ms"] > 0 and r["first_run_ms"] > 0
        assert r["peak_rss_mb"] > 0
        assert r["session"] is None  # no tuned session beside these models
    assert set(doc["samples_check"]) == set(MODELS)
    for check in doc["samples_check"].values():
        assert check["samples"] == 70
        assert check["max_abs_diff"] < 1e-4
        assert check["top1_agreement"] == 1.0


def test_isolated_run_writes_results(bundle: Path) -> None:
    out = bundle / "results.json"
    proc = run_runner(write_spec(bundle), "--out", out)
    assert proc.returncode == 0, proc.stderr
    check_document(json.loads(out.read_text()))
    assert "student" in proc.stderr and "top-1 agreement" in proc.stderr  # the human table


def test_no_isolate_prints_json_to_stdout(bundle: Path) -> None:
    proc = run_runner(write_spec(bundle), "--no-isolate", "--quiet")
    assert proc.returncode == 0, proc.stderr
    check_document(json.loads(proc.stdout))
    assert proc.stderr == ""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads VmHWM of /proc/self/status")
def test_child_peak_rss_is_its_own(bundle: Path) -> None:
    """ru_maxrss survives exec; the child must not report this (big) process's peak as its own."""
    ballast = bytearray(b"\x01") * (300 * 2**20)  # touches every page: this process's peak grows by 300 MiB
    del ballast
    parent_peak = edge_runner.peak_rss_mb()
    out = bundle / "results.json"
    assert edge_runner.main([str(write_spec(bundle, samples=None)), "--out", str(out), "--quiet"]) == 0
    peaks = [r["peak_rss_mb"] for r in json.loads(out.read_text())["results"]]
    assert max(peaks) < parent_peak - 200, (peaks, parent_peak)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("edge_runner: error: ")
    return lines[0]


def test_missing_model_file_is_bad_input(bundle: Path) -> None:
    (bundle / "teacher.onnx").unlink()
    proc = run_runner(write_spec(bundle))
    assert proc.returncode == 2
    assert "teacher.onnx" in one_error_line(proc)
    assert proc.stdout == ""


def test_unknown_provider_names_the_available_ones(bundle: Path) -> None:
    proc = run_runner(write_spec(bundle, providers=["NopeExecutionProvider"]))
    assert proc.returncode == 2
    line = one_error_line(proc)
    assert "NopeExecutionProvider" in line and "CPUExecutionProvider" in line


@pytest.mark.parametrize("isolate", [True, False])
def test_file_that_is_not_onnx_is_bad_input(bundle: Path, isolate: bool) -> None:
    (bundle / "student.onnx").write_bytes(b"not an onnx model\n")
    proc = run_runner(write_spec(bundle), *([] if isolate else ["--no-isolate"]))
    assert proc.returncode == 2
    assert "student.onnx" in one_error_line(proc)


def test_unreadable_spec_is_bad_input(tmp_path: Path) -> None:
    (tmp_path / "spec.json").write_text("{not json")
    proc = run_runner(tmp_path / "spec.json")
    assert proc.returncode == 2
    assert "spec" in one_error_line(proc)


def test_missing_onnxruntime_exits_3(bundle: Path) -> None:
    code = (
        "import runpy, sys; sys.modules['onnxruntime'] = None; sys.argv = ['edge_runner.py', sys.argv[1]]; "
        f"runpy.run_path({str(RUNNER)!r}, run_name='__main__')"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(write_spec(bundle))], capture_output=True, text=True)
    assert proc.returncode == 3
    assert (
        one_error_line(proc) == "edge_runner: error: onnxruntime is not installed here: pip install onnxruntime numpy"
    )


def test_runs_with_only_numpy_and_onnxruntime(bundle: Path, tmp_path: Path, bare_python: str) -> None:
    """The edge bundle's promise: the runner alone, in an environment without torch or kdpipe."""
    shutil.copy(RUNNER, bundle / "edge_runner.py")  # alone, as in an edge bundle: nothing of kdpipe next to it
    out = bundle / "results.json"
    proc = subprocess.run(
        [bare_python, str(bundle / "edge_runner.py"), str(write_spec(bundle)), "--out", str(out), "--quiet"],
        capture_output=True, text=True, timeout=60, env=clean_env(), cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    check_document(json.loads(out.read_text()))


TUNED = {"intra_op_num_threads": 2, "inter_op_num_threads": 2, "graph_optimization_level": "ORT_ENABLE_BASIC",
         "execution_mode": "ORT_PARALLEL"}  # fmt: skip


def test_tuned_session_beside_the_model_is_applied(bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime as ort

    (bundle / "student.session.json").write_text(json.dumps({**TUNED, "p50_ms": 0.1}))
    opened: dict[str, ort.SessionOptions] = {}
    real = ort.InferenceSession

    def spy(path: str, sess_options: ort.SessionOptions, providers: list[str]) -> ort.InferenceSession:
        opened.setdefault(Path(path).name, sess_options)  # the timing cells open first; the samples check last
        return real(path, sess_options=sess_options, providers=providers)

    monkeypatch.setattr(ort, "InferenceSession", spy)
    doc = edge_runner.run_spec(write_spec(bundle, threads=[1, 3]), isolate=False)
    options = opened["student.onnx"]
    assert options.intra_op_num_threads == 2 and options.inter_op_num_threads == 2
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    assert options.execution_mode == ort.ExecutionMode.ORT_PARALLEL
    assert opened["teacher.onnx"].graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    student = [r for r in doc["results"] if r["model"] == "student"]
    assert {r["threads"] for r in student} == {2} and all(r["session"] == TUNED for r in student)
    teacher = [r for r in doc["results"] if r["model"] == "teacher"]
    assert {r["threads"] for r in teacher} == {1, 3} and all(r["session"] is None for r in teacher)


def test_isolated_cells_apply_the_session_too(bundle: Path) -> None:
    (bundle / "student.session.json").write_text(json.dumps(TUNED))
    out = bundle / "results.json"
    proc = run_runner(write_spec(bundle), "--out", out, "--quiet")
    assert proc.returncode == 0, proc.stderr
    student = [r for r in json.loads(out.read_text())["results"] if r["model"] == "student"]
    assert student and all(r["threads"] == 2 and r["session"] == TUNED for r in student)


def test_bad_session_file_is_bad_input(bundle: Path) -> None:
    (bundle / "student.session.json").write_text(json.dumps({**TUNED, "execution_mode": "FAST"}))
    proc = run_runner(write_spec(bundle))
    assert proc.returncode == 2
    assert "student.session.json" in proc.stderr and "execution_mode" in proc.stderr


def test_tuned_session_round_trip(bundle: Path) -> None:
    """Really tune (tiny timing), write student.session.json, and the runner measures with what was chosen."""
    from kdpipe.edge.session_tuning import tune_session, write_session

    timing = {"warmup": 1, "min_runs": 4, "min_seconds": 0, "rounds": 3}
    tuned = tune_session(bundle / "student.onnx", list(INPUT_SHAPE), threads=[1], timing=timing)
    assert len(tuned["candidates"]) == 6 and all(c["p50_ms"] > 0 for c in tuned["candidates"])
    write_session(bundle / "student.onnx", tuned)
    doc = edge_runner.run_spec(write_spec(bundle), isolate=False)
    chosen = {k: v for k, v in tuned["session"].items() if k != "provider"}
    assert all(r["session"] == chosen for r in doc["results"] if r["model"] == "student")


def test_samples_check_ignores_the_spec_threads_and_tuned_sessions(
    bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The expected logits were computed on one thread with default options (the export stage calls the same
    ``sample_outputs``); the check opens each model that way whatever the spec's threads or a tuned session say,
    since another thread count or optimisation level may change the last bit of a sum."""
    (bundle / "student.session.json").write_text(json.dumps(TUNED))
    spec = edge_runner.load_spec(write_spec(bundle, threads=[3]))
    opened: list[tuple[str, int, object]] = []
    real = edge_runner.open_session

    def spy(path: str, provider: str, threads: int, session: dict | None = None):
        opened.append((Path(path).name, threads, session))
        return real(path, provider, threads, session)

    monkeypatch.setattr(edge_runner, "open_session", spy)
    checks = edge_runner.check_samples(spec)
    assert set(checks) == set(MODELS)
    assert sorted(opened) == sorted((f"{m}.onnx", 1, None) for m in MODELS)
