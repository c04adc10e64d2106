"""Damaged cache state of any shape is a miss (logged, removed, rebuilt), never a crash; and the cache lock."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import time

import pytest

from kdpipe.cache import Cache
from kdpipe.fileio import FileDigests
from kdpipe.lock import CacheBusy, CacheLock
from tests.conftest import clean_env

KEY = "k" * 64


def _commit(cache: Cache, key: str = KEY):
    staging = cache.staging_dir("teacher", key)
    (staging / "model.bin").write_bytes(b"weights")
    return cache.commit("teacher", key, staging, {"p": 1}, {"seconds": 1.5})


def _rewrite(entry, change) -> None:
    manifest = json.loads((entry / "manifest.json").read_text())
    changed = change(manifest)
    (entry / "manifest.json").write_text(json.dumps(manifest if changed is None else changed))


@pytest.mark.parametrize(
    "change",
    [
        lambda m: [m],  # a list
        lambda m: "manifest",  # a string
        lambda m: m.pop("files") and None,
        lambda m: m.update(files=["model.bin"]),
        lambda m: m.update(files={"model.bin": "sha"}),
        lambda m: m["files"]["model.bin"].update(bytes="7"),
        lambda m: m["files"]["model.bin"].update(sha256=None),
        lambda m: m.update(files={"../../etc/passwd": m["files"]["model.bin"]}),
        lambda m: m.update(files={"/etc/passwd": m["files"]["model.bin"]}),
        lambda m: m.update(manifest_version=99),
        lambda m: m.update(payload=[1]),
        lambda m: m.update(stage="export"),
        lambda m: m.update(key="x" * 64),
    ],
)
def test_manifest_of_another_shape_is_a_miss(tmp_path, caplog, change):
    cache = Cache(tmp_path)
    entry = _commit(cache)
    _rewrite(entry, change)
    assert not cache.is_cached("teacher", KEY)
    with caplog.at_level(logging.WARNING, logger="kdpipe"):
        assert cache.lookup("teacher", KEY) is None
    assert "damaged" in caplog.text and not entry.exists()
    assert cache.lookup("teacher", _commit(cache).name) is not None  # rebuilt in its place


@pytest.mark.parametrize("raw", [b"\xff\xfe\x00", b"", b"null", b"{" * 5000])
def test_manifest_bytes_that_are_not_json(tmp_path, raw):
    cache = Cache(tmp_path)
    entry = _commit(cache)
    (entry / "manifest.json").write_bytes(raw)
    assert cache.lookup("teacher", KEY) is None and not entry.exists()


def test_files_where_folders_belong(tmp_path):
    cache = Cache(tmp_path)
    (tmp_path / "teacher").write_text("not a stage folder")
    entry = _commit(cache)  # the stage folder is replaced
    entry_file = tmp_path / "teacher" / ("z" * 64)
    entry_file.write_text("not an entry")
    assert cache.lookup("teacher", "z" * 64) is None and not entry_file.exists()
    assert cache.lookup("teacher", entry.name) is not None
    work = tmp_path / "teacher" / f".work-{'w' * 64}"
    work.write_text("x")
    assert not cache.work_dir("teacher", "w" * 64).exists()


@pytest.mark.parametrize("text", ["[1, 2]", '{"a": 1}', '{"/x": [1, 2]}', "\xff"])
def test_fingerprint_memo_of_another_shape_is_ignored(tmp_path, text):
    (tmp_path / "fp.json").write_text(text, encoding="latin-1")
    f = tmp_path / "data.bin"
    f.write_bytes(b"one")
    assert len(FileDigests(tmp_path / "fp.json").file(f)) == 64


HOLD = textwrap.dedent(
    """
    import sys, time
    from kdpipe.lock import CacheLock
    lock = CacheLock(sys.argv[1]).acquire()
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
    """
)


def _holder(cache_dir, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(cache_dir), str(seconds)], stdout=subprocess.PIPE, text=True, env=clean_env()
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_lock_names_its_holder_and_no_wait_fails_at_once(tmp_path):
    proc = _holder(tmp_path, 30)
    try:
        with pytest.raises(CacheBusy) as info:
            CacheLock(tmp_path, wait=False).acquire()
        message = str(info.value)
        assert f"pid {proc.pid} on " in message and str(tmp_path) in message and "\n" not in message
        assert info.value.exit_code == 2
    finally:
        proc.kill()
        proc.wait()


def test_waiter_says_who_it_waits_for_then_gets_the_lock(tmp_path):
    proc = _holder(tmp_path, 1.0)
    lines: list[str] = []
    t0 = time.monotonic()
    with CacheLock(tmp_path, notify=lines.append) as lock:
        assert lock.holder()["pid"] == os.getpid()
    assert time.monotonic() - t0 > 0.2  # it did wait
    assert len(lines) == 1 and f"in use by pid {proc.pid}" in lines[0]
    proc.wait()


def test_a_killed_holders_lock_is_taken_over(tmp_path):
    proc = _holder(tmp_path, 60)
    proc.kill()  # SIGKILL: no cleanup ran
    proc.wait()
    with CacheLock(tmp_path, wait=False) as lock:
        assert lock.holder()["pid"] == os.getpid()
    assert CacheLock(tmp_path).holder() is None  # released: nothing claims it


FORKS = textwrap.dedent(
    """
    import os, sys, time
    from kdpipe.lock import CacheLock
    lock = CacheLock(sys.argv[1]).acquire()
    if os.fork() == 0:  # a worker forked while the lock is held; its fork hooks have run once fork returns here
        print(os.getpid(), flush=True)
        time.sleep(60)
        os._exit(0)
    time.sleep(60)
    """
)


def test_a_forked_worker_does_not_keep_a_killed_runs_lock(tmp_path):
    """kill -9 of a run whose forked workers live on: the workers hold no lock, the next run gets it."""
    proc = subprocess.Popen(
        [sys.executable, "-c", FORKS, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=clean_env()
    )
    worker = int(proc.stdout.readline())
    proc.kill()
    proc.wait()
    try:
        with CacheLock(tmp_path, wait=False) as lock:
            assert lock.holder()["pid"] == os.getpid()
    finally:
        os.kill(worker, 9)
