"""Benchmarks on another machine: ship an edge bundle over ssh/scp, run its runner there, merge the results.

Only the system's OpenSSH client is used (``ssh`` and ``scp``), non-interactively (``BatchMode=yes``): key-based
login must already work. Extra options (``-i KEY``, ``-o ...``, ``-J JUMP``) come from ``$KDPIPE_SSH_OPTIONS``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from kdpipe.config import LoadedConfig
from kdpipe.edge.bundle import make_bundle
from kdpipe.errors import KdpipeError, UsageError
from kdpipe.reporting.report import load_report, write_reports

SSH_OPTIONS_ENV = "KDPIPE_SSH_OPTIONS"
TARGET_FORM = "ssh://user@host[:port] (or 'local')"
RUNNER_ARGS = ["runner.py", "spec.json", "--out", "results.json", "--quiet"]


@dataclass(frozen=True)
class SshTarget:
    user: str
    host: str
    port: int = 22

    @property
    def name(self) -> str:
        """The default key of the target in report.json."""
        return f"{self.user}@{self.host}:{self.port}"

    @property
    def login(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host  # IPv6, as scp wants it
        return f"{self.user}@{host}"

    def __str__(self) -> str:
        return f"ssh://{self.login}:{self.port}"


def parse_target(target: str) -> SshTarget:
    """``ssh://user@host[:port]``; a password in it is refused (and never echoed)."""
    try:
        parts = urlsplit(target)
        port = parts.port or 22
    except ValueError:
        raise UsageError(f"bad target '{target}'; expected {TARGET_FORM}") from None
    if parts.scheme != "ssh" or not parts.hostname or not parts.username or parts.path not in ("", "/"):
        raise UsageError(f"bad target '{target}'; expected {TARGET_FORM}")
    if parts.password is not None:
        raise UsageError(f"a password in the target is not supported; use key-based login: {TARGET_FORM}")
    if parts.query or parts.fragment:
        raise UsageError(f"bad target '{target}'; expected {TARGET_FORM}")
    return SshTarget(parts.username, parts.hostname, port)


def _extra_options() -> list[str]:
    try:
        return shlex.split(os.environ.get(SSH_OPTIONS_ENV, ""))
    except ValueError as exc:
        raise UsageError(f"${SSH_OPTIONS_ENV}: cannot split it like a shell would ({exc})") from None


def _common(port_flag: str, target: SshTarget) -> list[str]:
    # ssh keeps the first value it is given for an option, so the user's options go before kdpipe's defaults.
    return [
        *_extra_options(), port_flag, str(target.port), "-o", "BatchMode=yes", "-o", "ConnectTimeout=10",
        "-o", "StrictHostKeyChecking=accept-new",
    ]  # fmt: skip


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no message"


class _Ssh:
    """Runs ssh/scp against one target and turns their failures into one-line kdpipe errors."""

    def __init__(self, target: SshTarget, timeout: float) -> None:
        self.target = target
        self.timeout = timeout

    def _call(
        self, argv: list[str], what: str, timeout: float | None = None, check_reach: bool = True
    ) -> subprocess.CompletedProcess[str]:
        limit = timeout or self.timeout
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=limit, check=False)
        except FileNotFoundError:
            raise UsageError(f"'{argv[0]}' is not installed here; install an OpenSSH client") from None
        except subprocess.TimeoutExpired:
            raise UsageError(f"{what} on {self.target} took over {limit:g} s; raise --timeout") from None
        if check_reach:
            self._check_reach(proc)
        return proc

    def _check_reach(self, proc: subprocess.CompletedProcess[str]) -> None:
        if proc.returncode == 255:
            raise UsageError(
                f"cannot reach {self.target}: {_last_line(proc.stderr).rstrip('.')}; check the host, port and that "
                f"key-based login works (ssh -p {self.target.port} {self.target.login})"
            )

    def ssh(self, command: str, what: str, timeout: float | None = None) -> subprocess.CompletedProcess[str]:
        return self._call(["ssh", *_common("-p", self.target), self.target.login, command], what, timeout)

    def scp(self, sources: list[str], dest: str, what: str) -> None:
        base = ["scp", *_common("-P", self.target), "-r"]
        proc = self._call([*base, *sources, dest], what, check_reach=False)
        if proc.returncode != 0:
            # OpenSSH >= 9 copies over SFTP, and a host without an sftp server (dropbear, a minimal sshd_config) just
            # closes the connection (exit 255). ssh itself worked a moment ago, so retry with the old scp protocol.
            if self._call([*base, "-O", *sources, dest], what, check_reach=False).returncode == 0:
                return
            self._check_reach(proc)
            raise UsageError(f"{what} on {self.target} failed: {_last_line(proc.stderr)}")


def _check_runner(returncode: int, stderr: str, where: str, python: str) -> None:
    """Map the runner's exit code (or the shell's 126/127 for a missing interpreter) to a kdpipe error."""
    if returncode == 0:
        return
    detail = _last_line(stderr).removeprefix("edge_runner: error: ")
    if returncode in (126, 127):
        raise UsageError(f"{where} has no {python} ({detail}): install Python 3 there, or pass --remote-python PATH")
    if returncode == 3:
        raise UsageError(f"{where} has no onnxruntime: pip install onnxruntime numpy there, or pass --remote-python")
    if returncode == 2:
        raise UsageError(f"the runner on {where} refused the bundle: {detail}")
    raise KdpipeError(f"the runner on {where} failed (exit code {returncode}): {detail}")


def _read_results(path: Path, where: str) -> dict[str, Any]:
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise KdpipeError(f"the runner on {where} wrote no readable results.json ({exc})") from None
    if not isinstance(results, dict) or results.get("schema") != "kdpipe.bench/1" or "results" not in results:
        raise KdpipeError(f"the runner on {where} wrote results of an unknown schema ({results.get('schema')!r})")
    return results


def bench_ssh(
    cfg: LoadedConfig,
    target: str,
    models: list[str] | None = None,
    timeout: float = 600,
    remote_python: str = "python3",
) -> dict[str, Any]:
    """Benchmark the last run's models on ``ssh://user@host[:port]``; returns the runner's results (not merged)."""
    where = parse_target(target)
    remote = _Ssh(where, timeout)
    with tempfile.TemporaryDirectory(prefix="kdpipe-bench-") as tmp:
        bundle = make_bundle(cfg, Path(tmp) / "bundle", models)
        proc = remote.ssh("mktemp -d", "creating a temporary folder", timeout=min(timeout, 60))
        folder = proc.stdout.strip()
        if proc.returncode != 0 or not folder.startswith("/") or "\n" in folder or folder == "/":
            raise UsageError(f"cannot create a temporary folder on {where}: {_last_line(proc.stderr or proc.stdout)}")
        try:
            files = [str(p) for p in sorted(bundle.iterdir())]
            remote.scp(files, f"{where.login}:{folder}/", "copying the bundle")
            run = " ".join(shlex.quote(a) for a in [remote_python, *RUNNER_ARGS])
            proc = remote.ssh(f"cd {shlex.quote(folder)} && {run}", "running the benchmark")
            _check_runner(proc.returncode, proc.stderr, str(where), remote_python)
            remote.scp([f"{where.login}:{folder}/results.json"], str(Path(tmp) / "results.json"), "fetching results")
        finally:
            # best effort: the host may have gone away, and the error that matters is already raised
            with contextlib.suppress(UsageError):
                remote.ssh(f"rm -rf -- {shlex.quote(folder)}", "removing the temporary folder", timeout=60)
        return _read_results(Path(tmp) / "results.json", str(where))


def bench_local(
    cfg: LoadedConfig, models: list[str] | None = None, timeout: float = 600, python: str | None = None
) -> dict[str, Any]:
    """Run the same bundle here, with ``python`` (default: this interpreter) in a temporary folder."""
    python = python or sys.executable
    with tempfile.TemporaryDirectory(prefix="kdpipe-bench-") as tmp:
        bundle = make_bundle(cfg, Path(tmp) / "bundle", models)
        try:
            proc = subprocess.run(
                [python, *RUNNER_ARGS], cwd=bundle, capture_output=True, text=True, timeout=timeout, check=False
            )
        except FileNotFoundError:
            raise UsageError(f"this machine has no {python}: pass --remote-python PATH") from None
        except subprocess.TimeoutExpired:
            raise UsageError(f"the benchmark took over {timeout:g} s; raise --timeout") from None
        _check_runner(proc.returncode, proc.stderr, "this machine", python)
        return _read_results(bundle / "results.json", "this machine")


def merge_target(cfg: LoadedConfig, name: str, target: str, results: dict[str, Any]) -> dict[str, Any]:
    """Add ``report["targets"][name]`` to the last run's report.json (re-read now: a bench can take minutes)."""
    report = load_report(cfg)
    report.setdefault("targets", {})[name] = {
        "target": target,
        "host": results.get("host", {}),
        "results": results["results"],
        "samples_check": results.get("samples_check", {}),
    }
    write_reports(cfg.output_dir, report)
    return report


def bench_target(
    cfg: LoadedConfig,
    target: str,
    models: list[str] | None = None,
    name: str | None = None,
    remote_python: str | None = None,
    timeout: float = 600,
) -> tuple[str, dict[str, Any]]:
    """``kdpipe bench``: measure on ``target`` (``ssh://...`` or ``local``), merge into report.json; (name, results)."""
    if target == "local":
        results = bench_local(cfg, models, timeout, remote_python)
        key, shown = name or "local", "local"
    else:
        where = parse_target(target)
        results = bench_ssh(cfg, target, models, timeout, remote_python or "python3")
        key, shown = name or where.name, str(where)
    merge_target(cfg, key, shown, results)
    return key, results


def format_results(results: dict[str, Any]) -> str:
    """A small table: p50/p90/p99 per model, provider, threads and batch size, then the samples check."""
    lines = [f"{'model':<22} {'provider':<22} {'thr':>3} {'batch':>5} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9}"]
    for r in results["results"]:
        provider = str(r.get("provider", "")).removesuffix("ExecutionProvider")
        lines.append(
            f"{r['model']:<22} {provider:<22} {r.get('threads', ''):>3} {r['batch_size']:>5} "
            f"{r['p50_ms']:>9.3f} {r['p90_ms']:>9.3f} {r['p99_ms']:>9.3f}"
        )
    for model, check in (results.get("samples_check") or {}).items():
        lines.append(
            f"samples {model}: {check['samples']} images, max |Δ logit| {check['max_abs_diff']:.2e}, "
            f"top-1 agreement {check['top1_agreement']:.4f}"
        )
    return "\n".join(lines)
