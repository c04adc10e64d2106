"""`kdpipe bundle` and `kdpipe bench --target` on a fake last run, including a real OpenSSH server on 127.0.0.1."""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import json
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml

from kdpipe.cli import main
from kdpipe.edge import RUNNER

SSHD = Path("/usr/sbin/sshd")
BENCH = {"batch_sizes": [1, 2], "warmup": 1, "min_runs": 3, "min_seconds": 0.0, "max_seconds": 2.0, "rounds": 2}
BUNDLE_FILES = {
    "student.onnx", "teacher.onnx", "samples.npz", "runner.py", "spec.json", "bundle.json", "README.txt",
    "MODEL_CARD.md",
}  # fmt: skip


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """A tiny CNN exported once to ONNX, with 8 sample images and its torch logits."""
    import torch

    folder = tmp_path_factory.mktemp("exported")
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        torch.nn.Linear(4, 3),
    ).eval()  # fmt: skip
    images = torch.randn(8, 1, 12, 12)
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated, and quick
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model, (images[:2],), str(folder / "student.onnx"), dynamo=False, opset_version=17,
            input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )  # fmt: skip
    with torch.no_grad():
        logits = model(images).numpy()
    np.savez(folder / "samples.npz", images=images.numpy(), expected_student=logits, expected_teacher=logits)
    return folder


@pytest.fixture
def project(tmp_path: Path, exported: Path) -> Path:
    """A config and a fake last run in out/: report.json, student.onnx (and the same file as teacher.onnx)."""
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump({"output_dir": "out", "benchmark": BENCH}))
    out = tmp_path / "out"
    out.mkdir()
    shutil.copyfile(exported / "student.onnx", out / "student.onnx")
    shutil.copyfile(exported / "student.onnx", out / "teacher.onnx")
    shutil.copyfile(exported / "samples.npz", out / "samples.npz")
    size = (out / "student.onnx").stat().st_size
    report = {
        "schema_version": 1, "kdpipe_version": "0.1.0",
        "dataset": {"name": "synthetic", "classes": ["a", "b", "c"], "input_shape": [1, 12, 12]},
        "models": {
            "teacher": {"arch": "tiny", "onnx": {"file": "teacher.onnx", "file_bytes": size}},
            "student": {"arch": "tiny", "onnx": {"file": "student.onnx", "file_bytes": size}},
        },
        "gates": [], "stages": {},
    }  # fmt: skip
    (out / "report.json").write_text(json.dumps(report))
    return tmp_path


def kdpipe(project: Path, *args: str) -> int:
    return main([*args, "-c", str(project / "pipeline.yaml")])


def check_bundle(folder: Path, models: set[str]) -> None:
    assert {p.name for p in folder.iterdir()} == {f"{m}.onnx" for m in models} | (BUNDLE_FILES - {"teacher.onnx"})
    spec = json.loads((folder / "spec.json").read_text())
    assert spec["models"] == {m: f"{m}.onnx" for m in models}
    assert spec["input_shape"] == [1, 12, 12] and spec["batch_sizes"] == [1, 2] and spec["threads"] == [1]
    assert spec["providers"] == ["CPUExecutionProvider"] and spec["samples"] == "samples.npz"
    assert (spec["warmup"], spec["min_runs"], spec["min_seconds"], spec["max_seconds"], spec["rounds"]) == (
        1,
        3,
        0,
        2,
        2,
    )
    meta = json.loads((folder / "bundle.json").read_text())
    assert meta["kdpipe_version"] and meta["created"] and meta["classes"] == ["a", "b", "c"]
    assert meta["input_shape"] == [1, 12, 12]
    for name in models:
        data = (folder / f"{name}.onnx").read_bytes()
        assert meta["models"][name] == {
            "file": f"{name}.onnx",
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        }
    with np.load(folder / "samples.npz") as npz:
        assert set(npz.files) == {"images"} | {f"expected_{m}" for m in models}
    runner = RUNNER
    assert (folder / "runner.py").read_bytes() == runner.read_bytes()
    assert "python3 runner.py spec.json --out results.json" in (folder / "README.txt").read_text()
    card = (folder / "MODEL_CARD.md").read_text()
    assert card.startswith("# Model card: student (synthetic classifier)") and "## Provenance" in card


def test_bundle_folder(project: Path) -> None:
    assert kdpipe(project, "bundle", "-o", str(project / "b")) == 0
    check_bundle(project / "b", {"student", "teacher"})
    assert kdpipe(project, "bundle", "-o", str(project / "b"), "--model", "student") == 0  # replaces its own bundle
    check_bundle(project / "b", {"student"})
    assert sorted(p.name for p in project.iterdir()) == ["b", "out", "pipeline.yaml"]


def test_bundle_archive(project: Path, tmp_path_factory) -> None:
    archive = project / "edge.tar.gz"
    assert kdpipe(project, "bundle", "-o", str(archive), "--model", "student") == 0
    with tarfile.open(archive) as tar:
        assert all(n.startswith("edge/") for n in tar.getnames())
        dest = tmp_path_factory.mktemp("unpacked")
        tar.extractall(dest, filter="data")
    check_bundle(dest / "edge", {"student"})
    assert sorted(p.name for p in project.iterdir()) == ["edge.tar.gz", "out", "pipeline.yaml"]  # no temp left


def test_bundle_unknown_model_is_usage_error(project: Path, capsys) -> None:
    assert kdpipe(project, "bundle", "-o", str(project / "b"), "--model", "studnet") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "studnet" in err and "student" in err and "teacher" in err
    assert not (project / "b").exists()


def check_target(project: Path, name: str, target: str) -> dict:
    report = json.loads((project / "out" / "report.json").read_text())
    entry = report["targets"][name]
    assert entry["target"] == target and entry["host"]["onnxruntime"]
    cells = {(r["model"], r["batch_size"]) for r in entry["results"]}
    assert cells == {("student", 1), ("student", 2)}
    assert all(r["p50_ms"] > 0 and r["runs"] >= 3 for r in entry["results"])
    check = entry["samples_check"]["student"]
    assert check["samples"] == 8 and check["max_abs_diff"] < 1e-4 and check["top1_agreement"] == 1.0
    assert report["models"]["student"]["onnx"]["file"] == "student.onnx"  # the rest of the report is kept
    return report


def test_bench_local_merges_targets(project: Path, capsys) -> None:
    assert kdpipe(project, "bench", "--target", "local", "--model", "student") == 0
    assert "p90 ms" in capsys.readouterr().out
    check_target(project, "local", "local")
    assert "targets" in (project / "out" / "report.json").read_text()


def test_a_bundle_runs_in_a_bare_venv_and_merges(project: Path, capsys, bare_python: str) -> None:
    """kdpipe's bundle under a Python with only numpy + onnxruntime; its results merge into the report."""
    args = ["--target", "local", "--model", "student", "--remote-python", bare_python, "--name", "bare"]
    assert kdpipe(project, "bench", *args) == 0
    report = check_target(project, "bare", "local")
    assert report["targets"]["bare"]["host"]["python"]


@pytest.mark.parametrize("target", ["local-host", "http://u@h", "ssh://host", "ssh://u:secret@h"])
def test_bench_bad_target(project: Path, capsys, target: str) -> None:
    assert kdpipe(project, "bench", "--target", target) == 2
    err = capsys.readouterr().err
    assert "ssh://user@host[:port]" in err and "secret" not in err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def start_sshd(d: Path, sftp: bool = True) -> Iterator[tuple[str, int, str, Path]]:
    """A throw-away OpenSSH server on 127.0.0.1 accepting one key; yields (user, port, options, remote tmp folder)."""
    if not SSHD.exists():
        pytest.skip("sshd not installed: apt-get install openssh-server")
    if not (shutil.which("ssh") and shutil.which("scp") and shutil.which("ssh-keygen")):
        pytest.skip("the OpenSSH client is not installed: apt-get install openssh-client")
    try:
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # sshd's privilege-separation folder
    except OSError as exc:
        pytest.skip(f"cannot create /run/sshd, which sshd needs: {exc}")
    d.mkdir(parents=True, exist_ok=True)
    for key in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-N", "", "-t", "ed25519", "-f", str(d / key)], check=True, timeout=30)
    (d / "authorized_keys").write_text((d / "client_key.pub").read_text())
    port = free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host_key'}\nAuthorizedKeysFile {d / 'authorized_keys'}\n"
        f"PidFile {d / 'sshd.pid'}\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
        "StrictModes no\nPermitRootLogin prohibit-password\nAcceptEnv TMPDIR\n"
        + ("Subsystem sftp internal-sftp\n" if sftp else "")  # without it, OpenSSH 9's scp (SFTP) cannot copy
    )
    remote_tmp = d / "remote-tmp"  # the "remote" mktemp -d works in here (SetEnv TMPDIR), so leftovers are visible
    remote_tmp.mkdir()
    log = (d / "sshd.log").open("w")
    proc = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(d / "sshd_config")], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 15
        while True:
            if proc.poll() is not None:
                pytest.fail(f"sshd exited with {proc.returncode}: {(d / 'sshd.log').read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"sshd did not listen within 15 s: {(d / 'sshd.log').read_text()[-2000:]}")
                time.sleep(0.1)
        options = (
            f"-i {d / 'client_key'} -o UserKnownHostsFile=/dev/null -o StrictHostKeyChecking=no -o LogLevel=ERROR "
            f"-o SetEnv=TMPDIR={remote_tmp}"
        )
        yield getpass.getuser(), port, options, remote_tmp
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    with start_sshd(tmp_path_factory.mktemp("sshd")) as server:
        yield server


def remote_folders(remote_tmp: Path) -> list[Path]:
    """The folders left in the remote TMPDIR (files there may come from the login environment, not from kdpipe)."""
    return [p for p in remote_tmp.iterdir() if p.is_dir()]


def test_bench_over_real_ssh(project: Path, sshd, monkeypatch, capsys) -> None:
    user, port, options, remote_tmp = sshd
    monkeypatch.setenv("KDPIPE_SSH_OPTIONS", options)
    target = f"ssh://{user}@127.0.0.1:{port}"
    args = ["bench", "--target", target, "--model", "student", "--remote-python", sys.executable, "--timeout", "120"]
    assert kdpipe(project, *args) == 0, capsys.readouterr().err
    assert "p99 ms" in capsys.readouterr().out
    check_target(project, f"{user}@127.0.0.1:{port}", target)
    assert kdpipe(project, *args, "--name", "edge-box") == 0
    report = check_target(project, "edge-box", target)
    assert set(report["targets"]) == {f"{user}@127.0.0.1:{port}", "edge-box"}
    assert remote_folders(remote_tmp) == []  # the remote temporary folders were removed


def test_bench_over_ssh_without_sftp_server(project: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """Like dropbear or a minimal sshd_config: scp's SFTP mode fails, and kdpipe falls back to `scp -O`."""
    with start_sshd(tmp_path / "sshd", sftp=False) as (user, port, options, remote_tmp):
        monkeypatch.setenv("KDPIPE_SSH_OPTIONS", options)
        target = f"ssh://{user}@127.0.0.1:{port}"
        args = ["bench", "--target", target, "--model", "student", "--remote-python", sys.executable]
        assert kdpipe(project, *args, "--timeout", "120") == 0, capsys.readouterr().err
        check_target(project, f"{user}@127.0.0.1:{port}", target)
        assert remote_folders(remote_tmp) == []


def test_bench_unreachable_host(project: Path, monkeypatch, capsys) -> None:
    if not shutil.which("ssh"):
        pytest.skip("the OpenSSH client is not installed: apt-get install openssh-client")
    monkeypatch.setenv("KDPIPE_SSH_OPTIONS", "-o UserKnownHostsFile=/dev/null")
    port = free_port()  # nothing listens there
    assert kdpipe(project, "bench", "--target", f"ssh://nobody@127.0.0.1:{port}", "--timeout", "30") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "cannot reach ssh://nobody@127.0.0.1:" in err and f"ssh -p {port}" in err
    assert "targets" not in json.loads((project / "out" / "report.json").read_text())


def test_bench_remote_without_onnxruntime(project: Path, sshd, tmp_path_factory, monkeypatch, capsys) -> None:
    user, port, options, remote_tmp = sshd
    monkeypatch.setenv("KDPIPE_SSH_OPTIONS", options)
    venv = tmp_path_factory.mktemp("bare") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    bare = venv / "bin" / "python"
    assert subprocess.run([str(bare), "-c", "import onnxruntime"], capture_output=True, timeout=60).returncode != 0
    target = f"ssh://{user}@127.0.0.1:{port}"
    assert kdpipe(project, "bench", "--target", target, "--remote-python", str(bare), "--timeout", "120") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "has no onnxruntime" in err
    assert kdpipe(project, "bench", "--target", target, "--remote-python", "/nonexistent/python3") == 2
    assert "has no /nonexistent/python3" in capsys.readouterr().err
    assert "targets" not in json.loads((project / "out" / "report.json").read_text())
    assert remote_folders(remote_tmp) == []
