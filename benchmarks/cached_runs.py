"""What the measuring scripts in benchmarks/ share: every row of a table is one cached ``kdpipe run``.

A script copies its config into a work folder (:func:`work_copy`: the cache and outputs there, so every row shares
the teacher and its features and an interrupted script resumes where it stopped), then runs each row with
``--set`` overrides (:func:`run_cached`) and reads the stages' metrics from the cache entries the run used
(:class:`Run`). The scripts run as ``python benchmarks/NAME.py``, so this folder is on ``sys.path``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

KDPIPE = [str(Path(sys.executable).parent / "kdpipe")]  # the console script of this interpreter's install


def work_copy(
    config: Path | dict[str, Any], work: Path, name: str = "", *, rows: bool = True, outputs: str = "out"
) -> Path:
    """A copy of ``config`` (a file, or a config as a dict, then with ``name``) in ``work``, with the cache every
    row shares in ``work/cache`` and outputs in ``work/outputs``. ``rows``: each row trains one method
    (``distill.compare: []``) and is a measurement, not a release candidate (no gates)."""
    if not isinstance(config, Path) and not name:
        raise ValueError("a config given as a dict needs a file name")
    work.mkdir(parents=True, exist_ok=True)
    conf = yaml.safe_load(config.read_text()) if isinstance(config, Path) else dict(config)
    if rows:
        conf.setdefault("distill", {})["compare"] = []
        conf.pop("gates", None)
    conf["cache_dir"] = str(work / "cache")
    conf["output_dir"] = str(work / outputs)
    path = work / (name or Path(str(config)).name)
    path.write_text(yaml.safe_dump(conf, sort_keys=False))
    return path


def key_value(text: str) -> tuple[str, str]:
    """An argparse ``type`` for a script's ``--set``: ``KEY=VALUE`` as ``kdpipe run --set`` takes it, refused when the
    script starts rather than after the rows before it have run."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return key, value


@dataclass
class Run:
    """One finished ``kdpipe run``: its config, exit code, wall-clock seconds and the cache entries it used."""

    config: Path
    code: int
    wall: float

    @property
    def conf(self) -> dict[str, Any]:
        return yaml.safe_load(self.config.read_text())

    def metrics(self, stage: str) -> dict[str, Any]:
        """The metrics of the cache entry the run used for ``stage`` (built now or found cached)."""
        cache = Path(self.conf["cache_dir"])
        info = json.loads((cache / "last_run.json").read_text())["stages"][stage]
        return json.loads((cache / info.get("stage", stage) / info["key"] / "metrics.json").read_text())

    def report(self) -> dict[str, Any]:
        return json.loads((Path(self.conf["output_dir"]) / "report.json").read_text())


def run_cached(
    config: Path, overrides: dict[str, object] | None = None, until: str | None = "validate", gates_fail: bool = False
) -> Run:
    """``kdpipe run -c config --set k=v ... [--until until]``; a cached row costs a second. Exits the script with
    the run's last lines when it fails; with ``gates_fail``, exit 1 (a failed gate) is a result, not a failure."""
    args = [*KDPIPE, "run", "-c", str(config), "--no-progress", *(["--until", until] if until else [])]
    for key, value in (overrides or {}).items():
        args += ["--set", f"{key}={value}"]
    t0 = time.perf_counter()
    done = subprocess.run(args, cwd=config.parent, text=True, capture_output=True)
    if done.returncode not in ((0, 1) if gates_fail else (0,)):
        sys.exit(f"{' '.join(args[1:])} failed (exit {done.returncode}):\n{done.stderr.strip()[-2000:]}")
    return Run(config, done.returncode, time.perf_counter() - t0)
