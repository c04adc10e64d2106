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
    import kdpipe.ml.data.sources as sources
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


def only_tools(bin_dir: Path, env: dict[str, str]) -> dict[str, str]:
    """PATH = the fake bin folder holding links to the few tools the script runs: no chromium, whatever is installed."""
    import shutil

    for tool in ("bash", "sh", "dirname", "id", "mktemp", "tail", "sed", "rm", "mkdir", "cp", "chmod", "cat"):
        found = shutil.which(tool)
        if found and not (bin_dir / tool).exists():
            (bin_dir / tool).symlink_to(found)
    return {**env, "PATH": str(bin_dir)}


def test_test_target_installs_chromium_once_and_says_loudly_when_it_cannot(machine):
    tmp, env, _ = machine
    env = only_tools(tmp / "bin", env)
    out = provision(env, "test")
    assert out.returncode == 0, out.stderr  # `make test` goes on; the screenshot test skips and says why
    log = (tmp / "apt.log").read_text().splitlines()
    assert "install -y -qq --no-install-recommends chromium" in log
    assert log.count("update -qq") == 1, log  # one apt-get update for everything the script installs
    assert "CANNOT INSTALL chromium HERE" in out.stderr and "NOT PROVISIONED" in out.stderr


def test_test_target_with_apt_that_works_installs_chromium(machine):
    tmp, env, files = machine
    env = only_tools(tmp / "bin", env)
    env["APT_SOURCE"] = str(files)
    apt = (tmp / "bin" / "apt-get").read_text()  # the fake apt-get also "installs" chromium
    fake = f"printf '#!/bin/sh\\\\n' > {tmp / 'bin' / 'chromium'}; chmod +x {tmp / 'bin' / 'chromium'}"
    (tmp / "bin" / "apt-get").write_text(apt.replace("case", f'case "$*" in *chromium*) {fake} ;; esac\ncase', 1))
    out = provision(env, "test")
    assert out.returncode == 0, out.stderr
    assert (tmp / "bin" / "chromium").is_file() and "CANNOT INSTALL chromium" not in out.stderr
    assert provision(env, "test").stderr.count("installing chromium") == 0  # installed: nothing more to do
