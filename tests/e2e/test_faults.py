"""Faults met by the CLI: a cache held by another process, a full disk. One line each, and the cache stays usable."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import yaml

from kdpipe.cli import main
from tests.conftest import TINY, deep_merge
from tests.unit.test_damaged_state import _holder


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(TINY))
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("command", [["run", "--until", "teacher"], ["clean"]])
def test_no_wait_names_the_process_holding_the_cache(project, capsys, command):
    (project / ".kdpipe").mkdir()
    (project / ".kdpipe" / "teacher").mkdir()
    proc = _holder(project / ".kdpipe", 60)
    try:
        code = main([*command, "--no-wait"])
        err = capsys.readouterr().err.strip()
    finally:
        proc.kill()
        proc.wait()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"in use by pid {proc.pid} on " in err and "kdpipe" in err
    assert (project / ".kdpipe" / "teacher").is_dir()  # clean removed nothing
    assert not (project / "kdpipe-out").exists()


def test_clean_waits_for_the_holder(project, capsys):
    (project / ".kdpipe" / "teacher" / ("a" * 64)).mkdir(parents=True)
    proc = _holder(project / ".kdpipe", 1.0)
    assert main(["clean"]) == 0
    captured = capsys.readouterr()
    assert f"waiting for cache {project / '.kdpipe'}: in use by pid {proc.pid}" in captured.err
    assert "removed 1 cache entry" in captured.out
    proc.wait()


def test_enospc_inside_a_stage_is_one_line_exit_2(project, capsys, monkeypatch):
    from kdpipe.stages import STAGES

    teacher = STAGES.get("teacher")

    def full(self, ctx):
        raise OSError(errno.ENOSPC, "No space left on device", str(ctx.out_dir / "model.pt"))

    monkeypatch.setattr(teacher, "run", full)
    code = main(["run", "--until", "teacher"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("kdpipe: error: no space left on device writing ") and "model.pt" in err
    assert "free " in err
    assert not list((project / ".kdpipe" / "teacher").glob(".tmp-*"))  # the half-built entry went


def test_torch_save_failure_on_a_full_disk(project, capsys, monkeypatch):
    """torch.save's C++ writer reports a full disk as "file write failed", without an errno."""
    from kdpipe import diskspace
    from kdpipe.stages import STAGES

    def full(self, ctx):
        monkeypatch.setattr(diskspace, "free_bytes", lambda path: 4096)  # the disk filled up while the stage ran
        raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")  # fmt: skip

    monkeypatch.setattr(STAGES.get("teacher"), "run", full)
    code = main(["run", "--until", "teacher"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("kdpipe: error: no space left on device") and "free 4.0 KiB" in err


@pytest.fixture
def tiny_disk(tmp_path):
    """A 32 KiB tmpfs (needs root and mount rights; skipped elsewhere). Yields (mount point, resize)."""
    import subprocess

    point = tmp_path / "disk"
    point.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32k", "tmpfs", str(point)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")

    def resize(size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(point)], check=True)

    yield point, resize
    subprocess.run(["umount", "-l", str(point)], check=False)


@pytest.mark.parametrize("features", [False, True])
def test_a_real_full_disk_then_recovery(project, capsys, tiny_disk, features):
    disk, resize = tiny_disk
    config = deep_merge(TINY, {"cache_dir": str(disk / "cache"), "features": {"enabled": features}})
    resize("200k")  # the teacher's weights fit, the run's checkpoints (and features) with their spare do not
    (project / "pipeline.yaml").write_text(yaml.safe_dump(config))
    code = main(["run", "--until", "distill"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"kdpipe: error: not enough space on {disk} for this run: needs ~"), err
    assert "checkpoints " in err and ("features " in err) == features and "free " in err, err
    assert not list((disk / "cache").glob("*/*"))  # refused before any stage: no cache entry, not even a half one
    resize("16m")  # a few-MB run needs a few MB (and a spare in proportion), not a fixed GiB
    assert main(["run", "--until", "distill"]) == 0, capsys.readouterr().err  # the same cache, now with room


def test_a_run_is_sized_to_what_it_writes(project, capsys, monkeypatch):
    """With 100 MB free, a run whose cache takes a few MB runs, its in-stage checks included; one whose features
    alone need more is refused before any stage, naming what needs the space."""
    from kdpipe import diskspace

    monkeypatch.setattr(diskspace, "free_bytes", lambda path: 100 * 10**6)
    (project / "pipeline.yaml").write_text(yaml.safe_dump(deep_merge(TINY, {"features": {"enabled": True}})))
    assert main(["run"]) == 0, capsys.readouterr().err
    assert sum(p.stat().st_size for p in (project / ".kdpipe").rglob("*") if p.is_file()) < 20 * 2**20
    big = {"data": {"synthetic": {"train_size": 8000}}, "features": {"enabled": True, "views": 10, "precision": "fp32"}}
    (project / "pipeline.yaml").write_text(yaml.safe_dump(deep_merge(TINY, big)))
    capsys.readouterr()
    code = main(["run"])
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("kdpipe: error: not enough space on ") and " for this run: needs ~" in err, err
    assert "(features " in err and "checkpoints " in err and "ONNX + variants " in err and "free 95.4 MiB" in err
    assert "running" not in captured.out  # no stage ran


def test_folders_where_the_cache_keeps_its_files(project, capsys):
    """Damaged state of another kind: the lock file, the digest memo and the last-run record are folders."""
    assert main(["run", "--until", "teacher"]) == 0
    cache = project / ".kdpipe"
    for name in (".lock", "fingerprints.json", "last_run.json"):
        target = cache / name
        target.unlink(missing_ok=True)
        (target / "junk").mkdir(parents=True)
    (project / "pipeline.yaml").write_text(yaml.safe_dump(deep_merge(TINY, {"distill": {"train": {"epochs": 1}}})))
    assert main(["run", "--until", "distill"]) == 0, capsys.readouterr().err
    assert (cache / "last_run.json").is_file()


def test_two_runs_on_one_cache_run_one_after_the_other(project):
    """Two `kdpipe run`s started together: the second waits, names the first, then finds its work cached."""
    import subprocess
    import sys

    from tests.conftest import clean_env

    cmd = [sys.executable, "-c", "from kdpipe.cli import entry; entry()", "run", "--until", "distill"]
    procs = [
        subprocess.Popen(cmd, cwd=project, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env())
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outs]
    stdout = "".join(out for out, _ in outs)
    assert stdout.count("▶ teacher") == 1 and stdout.count("▶ distill") == 1  # each stage ran once
    waited = [err for _, err in outs if "waiting for cache" in err]
    assert len(waited) == 1 and "in use by pid " in waited[0]
