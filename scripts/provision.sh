#!/usr/bin/env bash
# What a fresh machine needs besides the Python packages, in one place for `make demo`, `make test` and `.ci/run`.
#
#   scripts/provision.sh data   Fashion-MNIST: already found by kdpipe (data.root, $KDPIPE_DATA, Debian's
#                               /usr/share/datasets/fashion-mnist, ~/.cache/kdpipe/data) → nothing to do; else
#                               Debian's dataset-fashion-mnist where apt is usable; else torchvision's download
#                               into ~/.cache/kdpipe/data; else a message saying how, and exit 2.
#   scripts/provision.sh test   what the test suite needs, so that `make test` skips nothing: data, plus Debian's
#                               dataset-fashion-mnist (a test reads that folder), openssh-server/-client (the
#                               ssh-target tests run a real sshd) and chromium (the HTML report's screenshot test).
#                               Each is installed only when missing. What cannot be installed here is said loudly,
#                               once more at the end, and `make test` goes on: its tests skip and -ra says why.
#
# PYTHON (default .venv/bin/python) must have kdpipe installed. Idempotent: a provisioned machine does nothing.
set -uo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
PYTHON=${PYTHON:-.venv/bin/python}

say() { echo "provision: $*" >&2; }

APT_UPDATED=""   # "", "yes" or "failed": apt-get update runs at most once per call of this script
MISSING=()       # what `test` could not provision, repeated at the end

apt_install() {  # apt_install PACKAGE...: true when installed; never prompts for a password; on failure, says why
    local sudo="" log
    if ! command -v apt-get >/dev/null; then
        say "no apt-get on this machine"
        return 1
    fi
    if [ "$(id -u)" != 0 ]; then
        if ! sudo -n true 2>/dev/null; then
            say "not root and sudo needs a password: cannot run apt-get"
            return 1
        fi
        sudo="sudo -n"
    fi
    log=$(mktemp)
    if [ -z "$APT_UPDATED" ]; then
        if $sudo apt-get update -qq >"$log" 2>&1; then APT_UPDATED=yes; else APT_UPDATED=failed; fi
    fi
    if [ "$APT_UPDATED" = failed ]; then
        say "apt-get update failed earlier; trying the package lists already on this machine"
    fi
    if $sudo apt-get install -y -qq --no-install-recommends "$@" >>"$log" 2>&1; then
        rm -f "$log"
        return 0
    fi
    say "apt-get install $* failed; its last lines:"
    tail -n 5 "$log" | sed 's/^/provision:   /' >&2
    rm -f "$log"
    return 1
}

cannot() {  # cannot PACKAGE WHICH-TESTS: a loud line now, and one more in the summary at the end
    say "*** CANNOT INSTALL $1 HERE: $2 will SKIP (pytest -ra says why) ***"
    MISSING+=("$1 ($2)")
}

have_data() {  # kdpipe's own search order, without downloading
    "$PYTHON" - <<'EOF' >/dev/null 2>&1
from kdpipe.config import load_config
from kdpipe.ml.data.sources import locate_fashion_mnist

locate_fashion_mnist(load_config(None, ["data.download=false"]))
EOF
}

download_data() {  # torchvision's download, into the folder kdpipe looks in last
    "$PYTHON" - <<'EOF'
import sys

from torchvision.datasets import FashionMNIST

from kdpipe.ml.data.sources import default_download_root

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

debian_data() {  # tests/unit/test_sources.py reads Debian's folder itself, even when kdpipe found the data elsewhere
    [ -d /usr/share/datasets/fashion-mnist ] && return 0
    say "installing Debian's dataset-fashion-mnist (a test reads /usr/share/datasets/fashion-mnist)"
    apt_install dataset-fashion-mnist || cannot dataset-fashion-mnist "the test that reads Debian's folder"
}

ssh_tools() {
    [ -x /usr/sbin/sshd ] && command -v ssh >/dev/null && command -v scp >/dev/null &&
        command -v ssh-keygen >/dev/null && return 0
    say "installing openssh-server and openssh-client (the ssh-target tests run a real sshd on 127.0.0.1)"
    apt_install openssh-server openssh-client || cannot "openssh-server/openssh-client" "the ssh-target tests"
}

chromium_browser() {  # any of the names tests/unit/test_html_report.py looks for
    command -v chromium >/dev/null || command -v chromium-browser >/dev/null ||
        command -v google-chrome >/dev/null && return 0
    say "installing chromium (the HTML report's screenshot test runs it headless)"
    apt_install chromium && command -v chromium >/dev/null && return 0
    cannot chromium "the HTML report's screenshot test"
}

case "${1:-}" in
    data) data ;;
    test)
        data || MISSING+=("Fashion-MNIST (the tests that read it)")
        debian_data
        ssh_tools
        chromium_browser
        if [ ${#MISSING[@]} -gt 0 ]; then
            say "*** NOT PROVISIONED here (\`make test\` goes on; their tests skip, and -ra lists each with why):"
            for item in "${MISSING[@]}"; do say "***   $item"; done
        fi
        ;;
    *)
        echo "usage: $0 data|test" >&2
        exit 2
        ;;
esac
