"""scripts/provision.sh on a simulated fresh machine: data already there, Debian's package, torchvision's download,
or neither (a clear message, exit 2). apt-get, sudo, the Debian folder and the download are test doubles."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.unit.test_sources import fake_fashion

ROOT = Path(__file__).resolve().parents[2]
SITE = textwrap.dedent(
    """
    import builtins, os, shutil, sys
    from pathlib import Path
    import kdpipe.ml.sources as sources
    sources.DEBIAN_FASHION_MNIST = Path(os.environ["FAKE_DEBIAN"])

    def download(self):
        if os.environ["FAKE_DOWNLOAD"] == "fail":
            raise RuntimeError("no network")
        raw = Path(self.raw_folder)
        raw.mkdir(parents=True, exist_ok=True)
        for f in Path(os.environ["FAKE_DOWNLOAD"]).iterdir():
            shutil.copy(f, raw / f.name)

    real_import = builtins.__import__

    def patched_import(name, *args, **kwargs):  # patch torchvision only where it is imported: it is slow to load
        module = real_import(name, *args, **kwargs)
        found = getattr(sys.modules.get("torchvision.datasets"), "FashionMNIST", None)
        if found is not None and found.download is not download:
            found.download = download
        return module

    builtins.__import__ = patched_import
    """
)
APT = """#!/bin/sh
echo "$@" >> "$APT_LOG"
case "$*" in *install*) [ -n "$APT_SOURCE" ] && mkdir -p "$FAKE_DEBIAN" && cp "$APT_SOURCE"/* "$FAKE_DEBIAN"/ ;; esac
[ -n "$APT_SOURCE" ] || [ "$1" = update ] || [ "$1" = -qq ]
"""


@pytest.fixture
def machine(tmp_path):
    """An environment where nothing is installed: fake apt-get (and sudo), empty Debian folder, empty cache."""
    bin_dir, site = tmp_path / "bin", tmp_path / "site"
    bin_dir.mkdir()
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITE)
    (bin_dir / "apt-get").write_text(APT)
    (bin_dir / "sudo").write_text('#!/bin/sh\n[ "$1" = -n ] && shift\nexec "$@"\n')
    for tool in ("apt-get", "sudo"):
        (bin_dir / tool).chmod(0o755)
    files = fake_fashion(tmp_path / "files")
    for gz in list(files.glob("*.gz")):  # torchvision also keeps the unpacked files
        (files / gz.stem).write_bytes(gzip.decompress(gz.read_bytes()))
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("KDPIPE_DATA", "PYTHONHOME", "VIRTUAL_ENV")},
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "PYTHONPATH": str(site),
        "PYTHON": sys.executable,
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
        "FAKE_DEBIAN": str(tmp_path / "debian"),
        "FAKE_DOWNLOAD": "fail",
        "APT_LOG": str(tmp_path / "apt.log"),
        "APT_SOURCE": "",
    }
    return tmp_path, env, files


def provision(env: dict[str, str], what: str = "data") -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(ROOT / "scripts" / "provision.sh"), what], env=env, capture_output=True, text=True, timeout=300
    )


def test_nothing_available_says_how_and_exits_2(machine):
    _, env, _ = machine
    out = provision(env)
    assert out.returncode == 2, out.stderr
    assert "apt-get install dataset-fashion-mnist" in out.stderr and "KDPIPE_DATA" in out.stderr
    assert provision(env, "test").returncode == 0  # `make test` goes on: those tests skip


def test_debian_package_where_apt_works(machine):
    tmp, env, files = machine
    env["APT_SOURCE"] = str(files)
    out = provision(env)
    assert out.returncode == 0, out.stderr
    assert "install -y -qq --no-install-recommends dataset-fashion-mnist" in (tmp / "apt.log").read_text()
    assert (tmp / "debian" / "t10k-labels-idx1-ubyte.gz").is_file()


def test_torchvision_download_where_apt_cannot(machine):
    tmp, env, files = machine
    env["FAKE_DOWNLOAD"] = str(files)
    out = provision(env)
    assert out.returncode == 0, out.stderr
    assert (tmp / "cache" / "kdpipe" / "data" / "FashionMNIST" / "raw" / "train-images-idx3-ubyte.gz").is_file()
    env["FAKE_DOWNLOAD"] = "fail"
    (tmp / "apt.log").unlink()
    assert provision(env).returncode == 0  # found where kdpipe looks: nothing more to do
    assert not (tmp / "apt.log").exists()


def test_makefile_and_ci_share_the_script():
    makefile = (ROOT / "Makefile").read_text()
    assert "scripts/provision.sh data" in makefile and "scripts/provision.sh test" in makefile
    assert "make test" in (ROOT / ".ci" / "run").read_text()
