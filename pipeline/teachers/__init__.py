"""Teachers shipped with kdpipe: safetensors weights trained by kdpipe's own recipes, with their provenance.

A first run should not have to train a teacher for an hour before distillation can show anything, and a
teacher downloaded at run time would be neither reproducible nor available offline. So the package carries
a few small teachers (a Fashion-MNIST wrn_16_2 is ~2.8 MB) next to ``teachers.json``, a manifest that says
for each one what made it (the config in ``configs/`` and the command, the teacher stage's cache key, the
versions), how good it is (val and test top-1) and its sha256. ``teacher.path: shipped:NAME`` points a
config at one; :func:`shipped_path` resolves that to the file. No torch here: config validation and
``kdpipe teachers`` stay fast.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from kdpipe.errors import ConfigError, UsageError
from kdpipe.fileio import sha256_file

PREFIX = "shipped:"
FOLDER = Path(__file__).resolve().parent
MANIFEST = FOLDER / "teachers.json"
SCHEMA = "kdpipe.teachers/1"


@lru_cache(maxsize=1)
def manifest() -> dict[str, dict[str, Any]]:
    """``{name: entry}`` from ``teachers.json``; a broken manifest is a broken installation."""
    try:
        data = json.loads(MANIFEST.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"{MANIFEST}: the shipped-teacher manifest is unreadable ({exc}); reinstall kdpipe") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA or not isinstance(data.get("teachers"), dict):
        raise UsageError(f"{MANIFEST}: not a {SCHEMA} manifest; reinstall kdpipe")
    return data["teachers"]


def is_shipped(path: str | None) -> bool:
    return bool(path) and str(path).startswith(PREFIX)


def entry(name: str, key: str = "teacher.path", source: str | None = None) -> dict[str, Any]:
    """The manifest entry of shipped teacher ``name`` (``shipped:`` prefix optional); unknown names are bad input."""
    name = name.removeprefix(PREFIX)
    teachers = manifest()
    if name not in teachers:
        known = ", ".join(sorted(teachers)) or "none"
        raise ConfigError(key, f"no shipped teacher '{name}' (`kdpipe teachers` lists them: {known})", source)
    return teachers[name]


def shipped_path(name: str, key: str = "teacher.path", source: str | None = None) -> Path:
    """The weights file of shipped teacher ``name``; it must be in the installation."""
    path = FOLDER / entry(name, key, source)["file"]
    if not path.is_file():
        raise ConfigError(key, f"the shipped teacher file {path} is missing from this installation", source)
    return path


def verify(name: str) -> bool:
    """Whether the shipped file's sha256 is the one its manifest records."""
    return sha256_file(shipped_path(name)) == entry(name)["sha256"]


def describe() -> list[str]:
    """One block of lines per shipped teacher, for ``kdpipe teachers``."""
    lines = []
    for name, e in sorted(manifest().items()):
        recipe = e.get("recipe") or {}
        lines += [
            f"{PREFIX}{name}",
            f"  {e['arch']} on {e['dataset']}, {e['parameters']:,} parameters, {e['bytes']:,} bytes ({e['file']})",
            f"  val top-1 {100 * e['val_top1']:.2f}%, test top-1 {100 * e['test_top1']:.2f}%",
            f"  made by: {recipe.get('command', '?')}  (teacher cache key {str(recipe.get('cache_key', '?'))[:12]})",
            f"  sha256 {e['sha256']}",
            f"  use it: teacher: {{source: checkpoint, path: '{PREFIX}{name}'}}",
        ]
    return lines or ["no shipped teachers in this installation"]
