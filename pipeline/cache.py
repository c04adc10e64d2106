"""Content-addressed, atomic on-disk cache of stage outputs.

Layout under the cache root::

    <stage>/<key>/           a committed entry: the stage's files + manifest.json (written last)
    <stage>/.tmp-<key>-<pid>  an entry being committed (renamed into place when complete)
    <stage>/.work-<key>/      scratch that survives a killed run (epoch checkpoints), so it resumes
    fingerprints.json         file digests remembered by (path, size, mtime): see kdpipe.fileio.FileDigests

A key is the sha256 of the canonical JSON of everything that shapes the result (see :func:`cache_key`).
An entry whose manifest is missing, unreadable or disagrees with its files is a miss: it is logged,
removed and rebuilt, never a crash.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from kdpipe.fileio import atomic_write_text, sha256_file

log = logging.getLogger("kdpipe")

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: equal data always gives equal bytes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def cache_key(payload: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of a key payload."""
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()


def library_versions(names: Iterable[str]) -> dict[str, str]:
    """Installed versions of the libraries that shape a result (part of every cache key and the report)."""
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def key_payload(
    stage: str,
    version: int,
    config: dict[str, Any],
    upstream: dict[str, str],
    external: dict[str, Any],
    libraries: dict[str, str],
) -> dict[str, Any]:
    """Everything a stage's result depends on, in the shape that is hashed."""
    return {
        "stage": stage,
        "version": version,
        "config": config,
        "upstream": upstream,
        "external": external,
        "libraries": libraries,
    }


@dataclass
class Building:
    """An entry being built (see :meth:`Cache.building`): the stage writes under ``dir``; ``work_dir`` survives a
    killed run; ``extra`` goes into the manifest; ``entry`` is the committed folder once the block exits."""

    dir: Path
    work_dir: Path
    extra: dict[str, Any] = field(default_factory=dict)
    entry: Path | None = None


class Cache:
    """The cache root. Stages never touch it: the runner does."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def entry(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def work_dir(self, stage: str, key: str) -> Path:
        path = self.root / stage / f".work-{key}"
        if (path.exists() or path.is_symlink()) and not path.is_dir():  # damaged state: a file in its place
            log.warning("%s is not a folder; removed", path)
            path.unlink()
        return path

    def lookup(self, stage: str, key: str) -> dict[str, Any] | None:
        """The manifest of a complete, intact entry, or None. A damaged entry is removed (a miss)."""
        path = self.entry(stage, key)
        if not path.exists() and not path.is_symlink():
            return None
        problem = _verify(path, stage, key)
        if problem is None:
            return _read_manifest(path)[0]
        log.warning("cache entry %s/%s is damaged (%s); it will be rebuilt", stage, key[:12], problem)
        remove(path)
        return None

    def is_cached(self, stage: str, key: str) -> bool:
        """Cheap presence check for `kdpipe status` (a manifest that parses and names this key)."""
        manifest, problem = _read_manifest(self.entry(stage, key))
        return problem is None and manifest_problem(manifest, stage, key) is None

    @contextlib.contextmanager
    def building(self, stage: str, key: str, payload: dict[str, Any], replace: bool = False) -> Iterator[Building]:
        """Build an entry: stage it in a fresh folder, commit it if the block completes, abandon it if it raises.

        A killed process leaves only a ``.tmp-`` folder, swept by the next build of the same key; the work dir
        (epoch checkpoints) is kept until the entry is committed, so the next run resumes.
        """
        staging = self.staging_dir(stage, key)
        work = self.work_dir(stage, key)
        work.mkdir(parents=True, exist_ok=True)
        build = Building(dir=staging, work_dir=work)
        try:
            yield build
        except BaseException:
            self.abandon(staging)
            raise
        build.entry = self.commit(stage, key, staging, payload, build.extra, replace=replace)

    def staging_dir(self, stage: str, key: str) -> Path:
        """A fresh folder to build an entry in; leftovers of killed runs of this key are swept."""
        stage_dir = self.root / stage
        if (stage_dir.exists() or stage_dir.is_symlink()) and not stage_dir.is_dir():
            log.warning("%s is not a folder; removed", stage_dir)
            stage_dir.unlink()
        for old in (self.root / stage).glob(f".tmp-{key}-*"):
            pid = old.name.rsplit("-", 1)[-1]
            if not pid.isdigit() or int(pid) == os.getpid() or not _alive(int(pid)):
                shutil.rmtree(old, ignore_errors=True)
        tmp = self.root / stage / f".tmp-{key}-{os.getpid()}"
        tmp.mkdir(parents=True)
        return tmp

    def commit(
        self, stage: str, key: str, staging: Path, payload: dict[str, Any], extra: dict[str, Any], replace: bool = False
    ) -> Path:
        """Write the manifest last, then rename the staging folder into place (atomic on one filesystem).

        An existing entry of the same key is kept (a concurrent run built the same thing) unless ``replace``
        (a forced re-run), when the new entry is swapped in and the old one removed.
        """
        files = {}
        for f in sorted(p for p in staging.rglob("*") if p.is_file()):
            rel = f.relative_to(staging).as_posix()
            st = f.stat()
            files[rel] = {"bytes": st.st_size, "sha256": sha256_file(f), "mtime_ns": st.st_mtime_ns}
        manifest = {
            "manifest_version": MANIFEST_VERSION,
            "stage": stage,
            "key": key,
            "payload": payload,
            "files": files,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **extra,
        }
        atomic_write_text(staging / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True))
        final = self.entry(stage, key)
        if (final.exists() or final.is_symlink()) and _verify(final, stage, key) is not None:
            remove(final)  # damaged: never keep it in favour of the good entry just built
        if final.exists() and replace:
            old = final.with_name(f".old-{key}-{os.getpid()}")
            os.replace(final, old)
            os.replace(staging, final)
            shutil.rmtree(old, ignore_errors=True)
        elif final.exists():
            shutil.rmtree(staging)
        else:
            os.replace(staging, final)
        shutil.rmtree(self.work_dir(stage, key), ignore_errors=True)
        return final

    def abandon(self, staging: Path) -> None:
        shutil.rmtree(staging, ignore_errors=True)

    def clean(self, keep: dict[str, set[str]] | None = None) -> int:
        """Remove entries (all, or all but the ``keep`` stage→keys map). Returns the number removed."""
        removed = 0
        if not self.root.exists():
            return 0
        for stage_dir in self.root.iterdir():
            if not stage_dir.is_dir():
                continue
            for entry in stage_dir.iterdir():
                if keep and entry.name in keep.get(stage_dir.name, ()):
                    continue
                shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
                removed += 1
        return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def manifest_problem(manifest: Any, stage: str, key: str) -> str | None:
    """What is wrong with a manifest's shape (None: nothing). Valid JSON of another shape is damage too."""
    if not isinstance(manifest, dict):
        return f"manifest is a JSON {type(manifest).__name__}, not an object"
    if manifest.get("manifest_version") != MANIFEST_VERSION:
        return f"manifest_version {manifest.get('manifest_version')!r}, expected {MANIFEST_VERSION}"
    if manifest.get("key") != key:
        return "manifest names another key"
    if manifest.get("stage", stage) != stage:
        return "manifest names another stage"
    if not isinstance(manifest.get("payload"), dict):
        return "manifest has no payload"
    files = manifest.get("files")
    if not isinstance(files, dict):
        return "manifest lists no files"
    for rel, info in files.items():
        parts = Path(rel).parts
        if not rel or Path(rel).is_absolute() or ".." in parts or rel == MANIFEST:
            return f"manifest lists a path outside the entry: {rel!r}"
        if not isinstance(info, dict):
            return f"manifest entry of {rel} is not an object"
        if not (isinstance(info.get("bytes"), int) and isinstance(info.get("mtime_ns"), int)):
            return f"manifest entry of {rel} lacks bytes/mtime_ns"
        digest = info.get("sha256")
        if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
            return f"manifest entry of {rel} has no sha256"
    return None


def _read_manifest(path: Path) -> tuple[Any, str | None]:
    try:
        return json.loads((path / MANIFEST).read_text(encoding="utf-8")), None
    except FileNotFoundError:
        return None, "no manifest"
    except (OSError, ValueError) as exc:  # ValueError: bad JSON and bytes that are not UTF-8 alike
        return None, f"unreadable manifest: {type(exc).__name__}"


def _verify(path: Path, stage: str, key: str) -> str | None:
    if not path.is_dir():
        return "not a folder"
    manifest, problem = _read_manifest(path)
    if problem:
        return problem
    problem = manifest_problem(manifest, stage, key)
    if problem:
        return problem
    for rel, info in manifest["files"].items():
        f = path / rel
        if not f.is_file():
            return f"missing file {rel}"
        st = f.stat()
        if st.st_size != info["bytes"]:
            return f"file {rel} changed"
        # Like DVC and git, trust an untouched file (same size and mtime): re-hashing gigabytes of cached
        # features on every run would make a cached re-run slow. A touched file is re-hashed.
        if st.st_mtime_ns != info["mtime_ns"] and sha256_file(f) != info["sha256"]:
            return f"file {rel} changed"
    return None


def remove(path: Path) -> None:
    """Remove a file or a folder tree, whichever is there (damaged state may be either)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
