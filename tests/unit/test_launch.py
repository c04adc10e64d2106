"""torchrun's role, read from the environment alone (no torch import)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kdpipe.errors import UsageError
from kdpipe.launch import Launch, launched, launched_world_size


def test_a_plain_process_is_not_launched():
    assert launched({}) is None
    assert launched({"WORLD_SIZE": "1", "RANK": "0"}) is None
    assert launched_world_size({}) == 1


def test_torchrun_ranks_from_the_environment():
    env = {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    assert launched(env) == Launch(rank=3, local_rank=1, world_size=4, local_world_size=2)
    assert launched(env).role == "follower"
    assert launched({"WORLD_SIZE": "2", "RANK": "0"}).role == "leader"
    assert launched({"WORLD_SIZE": "2"}) == Launch(0, 0, 2, 2)  # what torchrun leaves out has its default


def test_a_malformed_variable_is_one_line():
    with pytest.raises(UsageError, match=r"environment variable RANK='x' is not an integer"):
        launched({"WORLD_SIZE": "2", "RANK": "x"})


def test_reading_the_role_imports_no_torch():
    code = (
        "import sys, os\n"
        "os.environ.update(WORLD_SIZE='2', RANK='1')\n"
        "from kdpipe.launch import launched\n"
        "assert launched().role == 'follower'\n"
        "print(sorted(m for m in ('torch', 'onnx', 'onnxruntime', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
