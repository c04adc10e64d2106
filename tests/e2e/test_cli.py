"""The CLI on a tiny synthetic pipeline: a full run, a re-run that runs no stage body, and the contracts."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml

from kdpipe.cli import main
from kdpipe.stages import STAGES
from tests.conftest import TINY, deep_merge

KDPIPE = [sys.executable, "-c", "from kdpipe.cli import entry; entry()"]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """One full cold run through the real console entry point, shared by the tests below."""
    root = tmp_path_factory.mktemp("e2e")
    (root / "pipeline.yaml").write_text(yaml.safe_dump(TINY))
    out = subprocess.run([*KDPIPE, "run", "-c", "pipeline.yaml"], cwd=root, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return root, out


@pytest.fixture
def project(first_run, tmp_path):
    """A private copy of the first run's folder (config + warm cache)."""
    root, _ = first_run
    dst = tmp_path / "p"
    shutil.copytree(root, dst)
    return dst


def forbid_stage_bodies(monkeypatch, allowed=()):
    ran = []
    for name in STAGES:
        cls = STAGES.get(name)
        real = cls.run

        def fake(self, ctx, _name=name, _real=real):
            ran.append(_name)
            if _name not in allowed:
                raise AssertionError(f"stage {_name} ran")
            return _real(self, ctx)

        monkeypatch.setattr(cls, "run", fake)
    return ran


def test_first_run_writes_the_report_contract(first_run):
    root, out = first_run
    assert out.stdout.count("running") == 6
    report = json.loads((root / "kdpipe-out" / "report.json").read_text())
    assert report["schema_version"] == 1
    for role in ("teacher", "student"):
        m = report["models"][role]
        assert {"arch", "parameters", "accuracy", "onnx", "latency"} <= set(m)
        assert 0 <= m["accuracy"]["top1"] <= m["accuracy"]["top5"] <= 1
        assert m["onnx"]["parity"]["max_abs_diff"] <= 1e-4 and m["onnx"]["parity"]["top1_agreement"] >= 0.999
        for batch in ("batch_1", "batch_4"):
            lat = m["latency"][batch]
            assert lat["p50_ms"] <= lat["p90_ms"] <= lat["p99_ms"] and lat["throughput_ips"] > 0
    student = report["models"]["student"]
    assert student["parameters_breakdown"]["total"] == student["parameters"]
    assert 0 <= student["accuracy"]["agreement_with_teacher"] <= 1
    assert set(report["stages"]) == {"teacher", "features", "distill", "validate", "export", "benchmark"}
    assert not any(s["cached"] for s in report["stages"].values())
    assert report["versions"]["torch"] and report["speedup_p50"]["batch_1"] > 0
    for name in ("student.onnx", "teacher.onnx", "student.pt", "report.md", "samples.npz"):
        assert (root / "kdpipe-out" / name).is_file()
    cell = student["latency_matrix"][0]
    assert {"provider", "threads", "batch_size", "peak_rss_mb", "session_create_ms", "first_run_ms"} <= set(cell)
    assert student["single_stream_p90_ms"] == student["latency"]["batch_1"]["p90_ms"]
    assert student["pytorch_latency"]["batch_1"]["p50_ms"] > 0
    assert report["deployment"]["recommended"] == "student"  # no variants, no gates


def test_variants_are_revalidated_benchmarked_and_ranked(project, monkeypatch, capsys):
    import onnx

    monkeypatch.chdir(project)
    variants = ["optimized", "fp16", "int8_dynamic", "int8_static"]
    code = main([
        "run", "--set", f"export.variants={variants}", "--set", "export.quantization.calibration_samples=32",
        "--set", "benchmark.intra_op_threads=[1, 2]", "--gate", "student.top1 >= 0.0",
    ])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    report = json.loads((project / "kdpipe-out" / "report.json").read_text())
    for v in variants:
        m = report["models"][f"student-{v}"]
        assert m["variant"] == v and 0 <= m["accuracy"]["top1"] <= 1
        assert 0 <= m["accuracy"]["agreement_with_fp32"] <= 1 and m["onnx"]["parity"]["max_abs_diff"] >= 0
        assert isinstance(m["slower_than_fp32"], bool) and m["latency"]["batch_4"]["p90_ms"] > 0
        assert {c["threads"] for c in m["latency_matrix"]} == {1, 2}
        meta = {p.key: p.value for p in onnx.load(project / "kdpipe-out" / m["onnx"]["file"]).metadata_props}
        assert meta["variant"] == v and meta["kdpipe_export_key"] == report["stages"]["export"]["key"]
        assert meta["classes"].split(",") == report["dataset"]["classes"] and meta["layout"] == "NCHW"
    assert report["models"]["student-optimized"]["onnx"]["parity"]["max_abs_diff"] < 1e-4
    assert (project / "kdpipe-out" / "student-int8_static.ranges.json").is_file()
    deployment = report["deployment"]
    assert {c["model"] for c in deployment["candidates"]} == {"student", *(f"student-{v}" for v in variants)}
    assert deployment["recommended"] in {c["model"] for c in deployment["candidates"] if c["passed"]}
    # a variant can be gated by name
    assert main(["gate", "--gate", "student-int8_static.top1 >= 0.0"]) == 0


def test_rerun_runs_no_stage_body(project, monkeypatch, capsys):
    monkeypatch.chdir(project)
    ran = forbid_stage_bodies(monkeypatch)
    assert main(["run"]) == 0
    assert ran == []
    out = capsys.readouterr().out
    assert out.count("cached") == 6
    report = json.loads((project / "kdpipe-out" / "report.json").read_text())
    assert all(s["cached"] for s in report["stages"].values())
    assert main(["status"]) == 0
    assert capsys.readouterr().out.count(" cached ") == 6


def test_a_cached_rerun_imports_no_torch_onnx_or_onnxruntime(project):
    """An all-cached `kdpipe run` does no heavy work: the torchrun role comes from the environment, the MACs from
    the export stage's metrics (counted once, when it ran), so torch, onnx and onnxruntime are never imported."""
    code = (
        "import sys\n"
        "from kdpipe.cli import main\n"
        "code = main(['run'])\n"
        "print('heavy:', sorted(m for m in ('torch', 'onnx', 'onnxruntime') if m in sys.modules))\n"
        "sys.exit(code)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=project, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count(" cached ") == 6, out.stdout
    assert "heavy: []" in out.stdout, out.stdout
    report = json.loads((project / "kdpipe-out" / "report.json").read_text())
    for name, model in report["models"].items():  # every exported model's MACs, read from the export's metrics
        assert model["macs"]["macs"] > 0 and model["macs"]["method"] == "onnx-graph", name


def test_changing_a_benchmark_setting_reruns_only_benchmark(project, monkeypatch, capsys):
    monkeypatch.chdir(project)
    ran = forbid_stage_bodies(monkeypatch, allowed=("benchmark",))
    assert main(["run", "--set", "benchmark.batch_sizes=[2]"]) == 0
    assert ran == ["benchmark"]
    assert "benchmark.batch_sizes [1, 4] → [2]" in capsys.readouterr().out


def test_changing_distill_epochs_keeps_the_teacher(project, monkeypatch):
    monkeypatch.chdir(project)
    ran = forbid_stage_bodies(monkeypatch, allowed=("distill", "validate", "export", "benchmark"))
    assert main(["run", "--set", "distill.train.epochs=1"]) == 0
    assert ran == ["distill", "validate", "export", "benchmark"]


def test_a_damaged_entry_is_rebuilt(project, monkeypatch, capsys):
    monkeypatch.chdir(project)
    entry = next(p for p in (project / ".kdpipe" / "validate").iterdir() if not p.name.startswith("."))
    (entry / "metrics.json").write_text("{}")
    ran = forbid_stage_bodies(monkeypatch, allowed=("validate",))
    assert main(["run"]) == 0
    assert ran == ["validate"]


def test_misspelled_key_is_one_line_exit_2(tmp_path):
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(deep_merge(TINY, {"distill": {"epochs": 3}})))
    out = subprocess.run([*KDPIPE, "run"], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr == "kdpipe: error: distill.epochs: unknown key; did you mean 'method'? (pipeline.yaml)\n" or (
        out.stderr.startswith("kdpipe: error: distill.epochs: unknown key") and out.stderr.count("\n") == 1
    )
    assert not (tmp_path / ".kdpipe").exists()


def test_parity_beyond_tolerance_fails_the_stage_with_both_figures(project, monkeypatch, capsys):
    monkeypatch.chdir(project)
    code = main(["run", "--set", "export.parity.max_abs_diff=1e-30"])
    err = capsys.readouterr().err
    assert code == 3
    assert "stage 'export' failed" in err and "> tolerance 1.0e-30" in err and err.count("\n") == 1
    exports = [p for p in (project / ".kdpipe" / "export").iterdir() if not p.name.startswith(".")]
    assert len(exports) == 1  # only the earlier good entry: nothing half-written


def test_report_formats_and_clean(project, monkeypatch, capsys):
    monkeypatch.chdir(project)
    assert main(["report", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["schema_version"] == 1
    summary = project / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    assert main(["report", "--format", "md"]) == 0
    assert "| student |" in capsys.readouterr().out and "| student |" in summary.read_text()
    assert main(["clean"]) == 0
    assert main(["report"]) == 2
    assert "run `kdpipe run` first" in capsys.readouterr().err


def test_killed_run_resumes_from_last_epoch(tmp_path):
    config = deep_merge(TINY, {"teacher": {"train": {"epochs": 40}}})
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(config))
    proc = subprocess.Popen([*KDPIPE, "run", "--until", "teacher"], cwd=tmp_path, stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    work = tmp_path / ".kdpipe" / "teacher"
    while time.time() < deadline and not list(work.glob(".work-*/epoch.pt")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(work.glob(".work-*/epoch.pt")), "no epoch checkpoint was written"
    assert not [p for p in work.iterdir() if not p.name.startswith(".")]  # nothing committed half
    out = subprocess.run([*KDPIPE, "run", "--until", "teacher"], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "resuming after epoch" in out.stdout
    assert not list(work.glob(".work-*")) and not list(work.glob(".tmp-*"))


def test_gates_pass_then_a_tightened_one_fails_with_both_figures(project, monkeypatch, capsys):
    monkeypatch.chdir(project)
    config = yaml.safe_load((project / "pipeline.yaml").read_text())
    config["gates"] = [
        {"metric": "top1", "model": "student", "min": 0.0},
        {"metric": "parity_max_abs_diff", "model": "student", "max": 1e-4},
        {"metric": "p99_ms", "model": "student", "batch_size": 1, "max": 1000.0},
    ]
    (project / "pipeline.yaml").write_text(yaml.safe_dump(config))
    assert main(["run"]) == 0
    assert "3 passed, 0 failed" in capsys.readouterr().out
    report = json.loads((project / "kdpipe-out" / "report.json").read_text())
    assert [g["passed"] for g in report["gates"]] == [True, True, True]

    code = main(["run", "--gate", "student.top1 >= 1.01"])
    out, err = capsys.readouterr()
    assert code == 1
    assert "FAILED student.top1 >= 1.01: measured" in out and "misses >= 1.01" in out
    assert err.startswith("kdpipe: error: 1 gate failed: student.top1 >= 1.01")
    report = json.loads((project / "kdpipe-out" / "report.json").read_text())
    assert report["gates"][-1]["passed"] is False  # the report says which gate failed

    assert main(["gate", "--gate", "student.p99_ms@1 <= 0.000001"]) == 1
    assert main(["gate"]) == 0
    assert main(["gate", "--gate", "student.nope >= 1"]) == 2
    assert main(["gate", "--baseline", str(project / "kdpipe-out" / "report.json")]) == 0
    capsys.readouterr()
    (project / "old.json").write_text(json.dumps({"schema_version": 99}))
    assert main(["gate", "--baseline", "old.json"]) == 2
    assert "schema_version 99, expected 1" in capsys.readouterr().err


def test_data_parallel_training_from_the_cli(tmp_path):
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(TINY))
    out = subprocess.run([*KDPIPE, "run", "--nproc", "2", "--until", "distill"], cwd=tmp_path, capture_output=True,
                         text=True)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("done") == 3  # teacher, features, distill: trained by 2 gloo processes
    status = subprocess.run([*KDPIPE, "status", "--set", "runtime.nproc=2"], cwd=tmp_path, capture_output=True,
                            text=True)  # fmt: skip
    assert status.stdout.splitlines()[2].split()[1] == "cached"  # distill
    assert not list((tmp_path / ".kdpipe").rglob(".dist-*"))


TORCHRUN = [
    sys.executable,
    "-m",
    "torch.distributed.run",
    "--standalone",
    "--nproc_per_node",
    "2",
    "-m",
    "kdpipe.cli",
]


def test_torchrun_ranks_train_like_forked_workers(tmp_path):
    """Two torchrun processes (gloo on CPU; NCCL takes the same path on GPUs) take exactly the steps of
    `--nproc 2`: the same cache keys and the same per-epoch results. Only rank 0 prints and writes the cache."""
    runs = {}
    for name, cmd in (("fork", [*KDPIPE, "run", "--nproc", "2"]), ("torchrun", [*TORCHRUN, "run"])):
        root = tmp_path / name
        root.mkdir()
        (root / "pipeline.yaml").write_text(yaml.safe_dump(TINY))
        out = subprocess.run([*cmd, "--until", "distill"], cwd=root, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        last = json.loads((root / ".kdpipe" / "last_run.json").read_text())
        keys = {stage: s["key"] for stage, s in last["stages"].items()}
        runs[name] = (out, keys, {s: json.loads((root / ".kdpipe" / s / k / "metrics.json").read_text())
                                  for s, k in keys.items() if s in ("teacher", "distill")})  # fmt: skip
    (_, fork_keys, fork_metrics), (tr_out, tr_keys, tr_metrics) = runs["fork"], runs["torchrun"]
    assert tr_keys == fork_keys  # data_parallel_processes: 2 either way
    assert tr_out.stdout.count("✓ distill   done") == 1  # rank 1 prints nothing
    for stage in ("teacher", "distill"):
        a, b = fork_metrics[stage]["history"], tr_metrics[stage]["history"]
        assert [h["val_top1"] for h in a] == [h["val_top1"] for h in b]
        assert [h["train_loss"] for h in a] == pytest.approx([h["train_loss"] for h in b], rel=1e-6, abs=1e-7)
    status = subprocess.run([*KDPIPE, "status", "--set", "runtime.nproc=2"], cwd=tmp_path / "torchrun",
                            capture_output=True, text=True)  # fmt: skip
    assert [line.split()[1] for line in status.stdout.splitlines()[:3]] == ["cached"] * 3


def test_torchrun_refuses_nproc_too(tmp_path):
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(TINY))
    out = subprocess.run(
        [*TORCHRUN, "run", "--set", "runtime.nproc=2"], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert out.returncode != 0
    assert "kdpipe: error: runtime.nproc: forks its own workers; under torchrun" in out.stderr


def test_nproc_on_a_gpu_points_to_torchrun(write_config, monkeypatch, capsys):
    """Forked workers cannot use CUDA: with a GPU present, --nproc fails at once, before any stage runs."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.chdir(write_config().parent)
    forbid_stage_bodies(monkeypatch)
    assert main(["run", "--nproc", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kdpipe: error: runtime.nproc: forks CPU workers, which CUDA does not allow;")
    assert "torchrun --standalone --nproc_per_node N -m kdpipe.cli run" in err and err.count("\n") == 1
