"""A regular (non-editable) install puts one package, `kdpipe`, into site-packages: nothing generic."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_wheel_holds_only_the_kdpipe_namespace(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("kdpipe-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"kdpipe"}, top
    for module in (
        "kdpipe/cli.py",
        "kdpipe/stages/teacher.py",
        "kdpipe/exporters/variants.py",
        "kdpipe/edge/runner.py",
    ):
        assert module in names, module
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "kdpipe = kdpipe.cli:entry" in zipfile.ZipFile(wheel).read(entry_points).decode()
