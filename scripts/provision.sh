#!/usr/bin/env bash
# What a fresh machine needs besides the Python packages, in one place for `make demo`, `make test` and `.ci/run`.
#
#   scripts/provision.sh data   Fashion-MNIST: already found by kdpipe (data.root, $KDPIPE_DATA, Debian's
#                               /usr/share/datasets/fashion-mnist, ~/.cache/kdpipe/data) → nothing to do; else
#                               Debian's dataset-fashion-mnist where apt is usable; else torchvision's download
#                               into ~/.cache/kdpipe/data; else a message saying how, and exit 2.
#   scripts/provision.sh test   data (best effort), plus openssh-server/-client for the ssh-target tests. Never
#                               fails: a test whose tool cannot be installed here skips and says why.
#
# PYTHON (default .venv/bin/python) must have kdpipe installed. Idempotent: a provisioned machine does nothing.
set -uo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
PYTHON=${PYTHON:-.venv/bin/python}

say() { echo "provision: $*" >&2; }

apt_install() {  # apt_install PACKAGE...: true when installed; quiet; never prompts for a password
    command -v apt-get >/dev/null || return 1
    local sudo=""
    if [ "$(id -u)" != 0 ]; then
        sudo -n true 2>/dev/null || return 1
        sudo="sudo -n"
    fi
    ($sudo apt-get update -qq && $sudo apt-get install -y -qq --no-install-recommends "$@") >/dev/null 2>&1
}

have_data() {  # kdpipe's own search order, without downloading
    "$PYTHON" - <<'EOF' >/dev/null 2>&1
from kdpipe.config import load_config
from kdpipe.ml.sources import locate_fashion_mnist

locate_fashion_mnist(load_config(None, ["data.download=false"]))
EOF
}

download_data() {  # torchvision's download, into the folder kdpipe looks in last
    "$PYTHON" - <<'EOF'
import sys

from torchvision.datasets import FashionMNIST

from kdpipe.ml.sources import default_download_root

root = default_download_root()
try:
    for train in (True, False):
        FashionMNIST(str(root), train=train, download=True)
except Exception as exc:
    print(f"provision: torchvision could not download Fashion-MNIST: {type(exc).__name__}: {exc}", file=sys.stderr)
    sys.exit(1)
print(f"provision: Fashion-MNIST downloaded into {root}", file=sys.stderr)
EOF
}

data() {
    have_data && return 0
    say "Fashion-MNIST not found; installing Debian's dataset-fashion-mnist"
    if apt_install dataset-fashion-mnist && have_data; then
        return 0
    fi
    say "apt cannot install it here; trying torchvision's download"
    if download_data && have_data; then
        return 0
    fi
    say "Fashion-MNIST is missing and could not be fetched. Either: apt-get install dataset-fashion-mnist"
    say "(Debian/Ubuntu), or put the four *-ubyte.gz files in a folder and set KDPIPE_DATA=/that/folder."
    return 2
}

ssh_tools() {
    [ -x /usr/sbin/sshd ] && command -v ssh >/dev/null && command -v scp >/dev/null && return 0
    say "installing openssh-server and openssh-client (the ssh-target tests run a real sshd on 127.0.0.1)"
    apt_install openssh-server openssh-client || say "cannot install them here: the ssh-target tests will skip"
    return 0
}

case "${1:-}" in
    data) data ;;
    test)
        data || say "the tests that read real Fashion-MNIST will skip"
        ssh_tools
        ;;
    *)
        echo "usage: $0 data|test" >&2
        exit 2
        ;;
esac
