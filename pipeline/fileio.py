"""Small file helpers every layer uses: one sha256, one atomic write, and remembered file digests."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def clear_folder(path: Path) -> None:
    """Remove a folder standing where a file belongs (damaged state: a file can never be written in its place)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)


@contextlib.contextmanager
def atomic_path(path: Path, mode: int = 0o644) -> Iterator[Path]:
    """A temporary path beside ``path`` for any writer (``torch.save``, ``onnx.save``, a tar file); it replaces
    ``path`` when the block completes and is removed when it raises, so readers see the old file or the new one,
    never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: Path, text: str) -> Path:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any, indent: int | None = 2) -> Path:
    """:func:`atomic_write_text` of ``obj`` as JSON (keys in insertion order)."""
    return atomic_write_text(path, json.dumps(obj, indent=indent) + ("\n" if indent else ""))


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class FileDigests:
    """sha256 of input files, remembered by (path, size, mtime_ns) so unchanged large inputs are not re-read.

    An in-process helper persisted to one small JSON file; not the stage cache.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._dirty = False
        try:
            memo = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            memo = {}
        # Valid JSON of another shape is as damaged as bad JSON: keep only well-formed entries.
        self._memo: dict[str, list[Any]] = {
            k: v
            for k, v in (memo.items() if isinstance(memo, dict) else ())
            if isinstance(v, list) and len(v) == 3 and isinstance(v[2], str)
        }

    def file(self, path: Path) -> str:
        st = path.stat()
        real = str(path.resolve())
        hit = self._memo.get(real)
        if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
            return hit[2]
        digest = sha256_file(path)
        self._memo[real] = [st.st_size, st.st_mtime_ns, digest]
        self._dirty = True
        return digest

    def save(self) -> None:
        if not self._dirty:
            return
        clear_folder(self.path)
        atomic_write_text(self.path, json.dumps(self._memo))
        self._dirty = False
