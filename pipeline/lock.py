"""One process at a time on a cache: an advisory lock that names its holder.

Two runs on one cache (or a run and ``kdpipe clean``) used to collide: one removed the other's work
folder and failed with an incidental error. Now whatever writes the cache holds ``<cache_dir>/.lock``
(``fcntl.flock``, exclusive). A second process waits, saying which process (pid, host, command, since
when) holds it, or with ``--no-wait`` fails at once naming it (:class:`CacheBusy`, exit 2).

Why flock and not the ``filelock`` package: the kernel drops a flock when its holder dies, however it
dies (kill -9 included), so a dead holder's lock is simply taken over, with no stale-lock heuristics;
and the holder's description lives in the locked file itself, which a waiter can read without
truncating it (``filelock`` may truncate the file when it opens it). Ground floor: imports no torch.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from kdpipe.errors import UsageError
from kdpipe.fileio import clear_folder

LOCK = ".lock"
_HELD: set[int] = set()  # descriptors of the locks this process holds


def _forget_in_child() -> None:
    """A forked child (data-parallel workers, DataLoader workers) must not keep the cache locked: a flock lives
    as long as any descriptor of it, so a worker outliving a killed run would lock every later run out. Closing
    the child's copies (never unlocking: that would release the parent's lock) leaves the parent the only holder."""
    for fd in list(_HELD):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


os.register_at_fork(after_in_child=_forget_in_child)


class CacheBusy(UsageError):
    """Another process holds the cache and the caller asked not to wait (exit 2)."""


def describe(holder: dict | None) -> str:
    """``pid 123 on host (kdpipe run -c p.yaml), since 15:02:11`` — or what is known of it."""
    if not holder:
        return "another process (it has not said which yet)"
    since = time.strftime("%H:%M:%S", time.localtime(holder["started"])) if holder.get("started") else "?"
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} ({holder.get('command', '?')}), since {since}"


class CacheLock:
    """An exclusive lock on a cache folder; use as a context manager or with :meth:`acquire`/:meth:`release`."""

    def __init__(self, cache_dir: Path, wait: bool = True, notify: Callable[[str], None] | None = None) -> None:
        self.cache_dir = Path(cache_dir)
        self.path = self.cache_dir / LOCK
        self.wait = wait
        self.notify = notify or (lambda line: print(line, file=sys.stderr, flush=True))
        self._fd: int | None = None
        self._created = False

    def holder(self) -> dict | None:
        """Who holds (or last held) the lock, as it wrote itself into the lock file; None if unknown."""
        try:
            data = json.loads(self.path.read_text(encoding="utf-8") or "null")
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def acquire(self) -> CacheLock:
        if self._fd is not None:
            return self
        self._created = not self.cache_dir.exists()
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        clear_folder(self.path)  # damaged state: nobody can hold a folder
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                who = describe(self.holder())
                if not self.wait:
                    raise CacheBusy(f"cache {self.cache_dir} is in use by {who}; try again when it ends") from None
                self.notify(f"kdpipe: waiting for cache {self.cache_dir}: in use by {who} (--no-wait fails instead)")
                fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": " ".join(["kdpipe", *sys.argv[1:]]) if sys.argv else "kdpipe",
            "started": time.time(),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        self._fd = fd
        _HELD.add(fd)
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        _HELD.discard(fd)
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass  # a full or read-only disk must not keep the lock held
        if self._created and [p.name for p in self.cache_dir.iterdir()] == [LOCK]:
            self.path.unlink(missing_ok=True)  # a run that failed before writing anything leaves nothing behind
            self.cache_dir.rmdir()
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def __enter__(self) -> CacheLock:
        return self.acquire()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
