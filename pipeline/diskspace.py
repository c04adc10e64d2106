"""Disk space and writable folders: checked before writing, and a full disk said in one line.

A full disk used to end a run with a signal (a memory-mapped write into a sparse file faults with
SIGBUS when the filesystem cannot back the page) or with an error that never said the disk was full.
Here a run's writes are estimated before any stage runs and checked against the free space of each
filesystem they land on (:func:`check_run_space`: ``not enough space on /x for this run: needs ~X
(features A, checkpoints B, ...), free Y``), large artifacts are checked again just before they are
written (:func:`ensure_space`), files that are written through a memory map get their blocks reserved
first (``posix_fallocate``), and any ENOSPC, EDQUOT or EROFS becomes :class:`DiskFullError` (exit 2):
``no space left on device writing FILE (needs ~X, free Y)``. Every estimate keeps a spare proportional to
it (:func:`spare`: a quarter, at least 4 MiB), never a fixed amount: a few-MB run fits on a nearly full
disk, a large one is refused with the room it needs. Ground floor: imports no torch.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from kdpipe.errors import ConfigError, UsageError

FULL = {errno.ENOSPC, errno.EDQUOT}
READ_ONLY = {errno.EROFS}
MARGIN = 1 << 20  # below a MiB free, a write that failed without saying why is taken for a full disk
MIN_SPARE = 4 << 20  # the smallest spare kept beyond an estimate: manifests, logs and reports come after


class DiskFullError(UsageError):
    """The filesystem is full (or read-only) where kdpipe has to write. One line, exit 2."""

    def __init__(self, path: Path | str | None, needs: int | None = None, free: int | None = None, ro: bool = False):
        self.path = path
        where = f" writing {path}" if path else ""
        if ro:
            super().__init__(f"read-only file system{where}; point cache_dir/output_dir at a writable folder")
            return
        figures = [f"needs ~{human(needs)}" if needs is not None else ""]
        figures.append(f"free {human(free)}" if free is not None else "")
        detail = ", ".join(f for f in figures if f)
        super().__init__(f"no space left on device{where}" + (f" ({detail})" if detail else ""))


class RunSpaceError(DiskFullError):
    """A run whose writes will not fit on a filesystem, said before any stage runs: how much each part needs."""

    def __init__(self, where: Path, parts: dict[str, int], free: int):
        self.path = where
        total = sum(parts.values())
        shares = [f"{label} {human(n)}" for label, n in parts.items() if n]
        detail = ", ".join([*shares, f"spare {human(spare(total))}"])
        UsageError.__init__(
            self,
            f"not enough space on {where} for this run: needs ~{human(total + spare(total))} ({detail}), free "
            f"{human(free)}; free some space, or point cache_dir and output_dir at a larger disk",
        )


def spare(needs: int) -> int:
    """The room kept beyond an estimate of ``needs`` bytes: a quarter of it (estimates are give or take), and at
    least :data:`MIN_SPARE` (the manifests, logs and reports written after the big files)."""
    return max(MIN_SPARE, needs // 4)


def human(n: int | None) -> str:
    """Bytes as a short figure: 512 B, 3.4 MiB, 12 GiB."""
    if n is None:
        return "?"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def existing_ancestor(path: Path) -> Path:
    """``path`` itself or the nearest folder above it that exists (where new files would land)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: Path) -> int | None:
    """Bytes available to this user on the filesystem that holds (or would hold) ``path``."""
    try:
        return shutil.disk_usage(existing_ancestor(path)).free
    except OSError:
        return None


def mount_point(path: Path) -> Path:
    """The top folder of the filesystem that holds ``path`` (or would hold it)."""
    path = existing_ancestor(path).resolve()
    try:
        while path != path.parent and os.stat(path.parent).st_dev == os.stat(path).st_dev:
            path = path.parent
    except OSError:
        pass
    return path


def ensure_space(path: Path, needs: int) -> None:
    """Raise :class:`DiskFullError` now if ``needs`` bytes (plus its :func:`spare`) will not fit where ``path``
    goes."""
    free = free_bytes(path)
    if free is not None and needs + spare(needs) > free:
        raise DiskFullError(path, needs, free)


def check_run_space(parts: Iterable[tuple[str, Path, int]]) -> None:
    """Refuse a run whose writes will not fit: ``parts`` are (what, folder it goes into, bytes); they are summed per
    filesystem (the cache and the output folder may be on different disks) and each sum, plus its :func:`spare`,
    must fit in that filesystem's free space. Raises :class:`RunSpaceError` naming what needs the space."""
    groups: dict[int, tuple[Path, dict[str, int]]] = {}
    for label, folder, size in parts:
        base = existing_ancestor(folder)
        try:
            device = os.stat(base).st_dev
        except OSError:
            continue
        sizes = groups.setdefault(device, (base, {}))[1]
        sizes[label] = sizes.get(label, 0) + max(0, int(size))
    for base, sizes in groups.values():
        total = sum(sizes.values())
        free = free_bytes(base)
        if free is not None and total + spare(total) > free:
            raise RunSpaceError(mount_point(base), sizes, free)


def check_writable_dir(path: Path, key: str, source: str | None) -> None:
    """A folder setting (``cache_dir``, ``output_dir``) that is a file, sits below a file, or is not writable
    is bad input: one line naming the key, before anything runs. Creates nothing."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(key, f"{path} is a file, not a folder", source)
    base = existing_ancestor(path)
    if not base.is_dir():
        raise ConfigError(key, f"{path} cannot be created: {base} is a file", source)
    try:
        read_only = bool(os.statvfs(base).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    if read_only:
        raise ConfigError(key, f"{path} is on a read-only file system", source)
    if not os.access(base, os.W_OK | os.X_OK):
        what = path if base == path else f"{base} (where {path} would be created)"
        raise ConfigError(key, f"{what} is not writable", source)


def check_folder_layout(cache_dir: Path, output_dir: Path, config_dir: Path | None, source: str | None) -> None:
    """``output_dir`` is kdpipe's to replace (``kdpipe clean`` removes it): it must not be, or hold, the cache or
    the config's own folder, and the cache must not be inside it."""
    out, cache = Path(output_dir).resolve(), Path(cache_dir).resolve()
    if config_dir is not None:
        here = Path(config_dir).resolve()
        if out == here or out in here.parents:
            raise ConfigError(
                "output_dir", f"{out} holds the config's own folder ({here}); `kdpipe clean` would remove it", source
            )
    if out == cache or out in cache.parents or cache in out.parents:
        raise ConfigError("output_dir", f"{out} overlaps cache_dir {cache}; give them separate folders", source)


def reserve(path: Path) -> None:
    """Allocate every block of an already sized (sparse) file, so that writing it through a memory map
    cannot fault later: a full disk fails here, with a message, instead of killing the process."""
    path = Path(path)
    size = path.stat().st_size
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno in FULL | READ_ONLY:
            raise DiskFullError(path, size, free_bytes(path), ro=exc.errno in READ_ONLY) from None
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
        ensure_space(path, size)  # a filesystem without fallocate: the best we can do is check
    finally:
        os.close(fd)


def _chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and all(cur is not seen for seen in out):
        out.append(cur)
        cur = cur.__cause__ or cur.__context__
    return out


def as_disk_error(exc: BaseException, default_path: Path | str | None = None) -> DiskFullError | None:
    """The :class:`DiskFullError` an exception (or anything in its cause chain) amounts to, else None."""
    chain = _chain(exc)
    for cur in chain:
        if isinstance(cur, DiskFullError):
            return cur
        if isinstance(cur, OSError) and cur.errno in FULL | READ_ONLY:
            path = cur.filename or default_path
            return DiskFullError(path, None, free_bytes(Path(path)) if path else None, ro=cur.errno in READ_ONLY)
    # Errors that lost their errno on the way (torch.save's C++ writer says "file write failed" or "unexpected
    # pos"): when the disk being written is full, that is what they are.
    if any("No space left on device" in str(cur) for cur in chain):
        return DiskFullError(default_path, None, free_bytes(Path(default_path)) if default_path else None)
    free = free_bytes(Path(default_path)) if default_path else None
    if free is not None and free < MARGIN:
        return DiskFullError(default_path, None, free)
    return None


@contextmanager
def writing(path: Path, needs: int | None = None) -> Iterator[None]:
    """Check space for a large write first (when ``needs`` is known), and turn a full disk met while
    writing into one line naming ``path``."""
    if needs is not None:
        ensure_space(path, needs)
    try:
        yield
    except DiskFullError:
        raise
    except Exception as exc:
        err = as_disk_error(exc, path)
        if err is None:
            raise
        if needs is not None and err.path == path:
            raise DiskFullError(path, needs, free_bytes(path)) from None
        raise err from None
