"""Training images without labels (``data.unlabeled``) and label scarcity (``data.labels_per_class``).

An unlabelled training image is one whose label is :data:`UNLABELED` (-1): it joins the training split, never
the validation or test split, and a :class:`~kdpipe.ml.data.memory.Batch` says which of its images have labels
(``Batch.labeled``). Loss terms that need a label read the labelled part only; the teacher's terms read all.

``data.unlabeled`` names the images: a folder (every image under it, class folders or not), a list file of image
paths (one a line, or the first column of a CSV; relative to the list file), or WebDataset shards (a ``.tar`` path,
a brace pattern or a ``::`` list; samples need no ``cls``, and one they carry is ignored). They are listed once per
loaded config (the fingerprint, the streaming decision, the checks and the loading share the listing), as the
dataset's own files are. ``data.labels_per_class`` keeps the labels of a seeded, class-balanced choice of the
training split and turns the rest into unlabelled images.

No torch here, and numpy only where arrays are made: ``kdpipe status`` plans with it.
"""

from __future__ import annotations

import csv
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdpipe.config import LoadedConfig, looks_like_shards
from kdpipe.errors import ConfigError, UsageError
from kdpipe.ml.data.filelists import IMAGE_SUFFIXES, SKIP_HINT, FileList, check_shard, expand_shards, shard_index

if TYPE_CHECKING:
    import numpy as np

UNLABELED = -1
KEY = "data.unlabeled"


@dataclass
class Unlabeled:
    """The listed unlabelled images: files (paths relative to ``root``) or shards; what was skipped listing them."""

    root: Path | None
    paths: list[str] = field(default_factory=list)
    shards: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    _shard_keys: list[list[str]] | None = None

    @property
    def streams_as_shards(self) -> bool:
        return bool(self.shards)

    def shard_keys(self) -> list[list[str]]:
        """Each shard's sample keys, in tar order (read from the tar headers once)."""
        if self._shard_keys is None:
            self._shard_keys = [shard_index(p, labeled=False)[0] for p in self.shards]
        return self._shard_keys

    def __len__(self) -> int:
        return sum(map(len, self.shard_keys())) if self.shards else len(self.paths)

    def file_list(self) -> FileList:
        """The files as a :class:`FileList` of unlabelled rows."""
        import numpy as np

        assert self.root is not None, "shards have no file list"
        paths = np.array([os.fsencode(p) for p in self.paths], dtype=np.bytes_)
        return FileList(self.root, paths, np.full(len(self.paths), UNLABELED, dtype=np.int64))


def listing(cfg: LoadedConfig) -> Unlabeled | None:
    """``data.unlabeled`` listed (once per loaded config), or None when it is not set. A path that does not exist,
    holds no images, or lists a missing file is one line naming it (a missing listed file is skipped and counted
    with ``data.skip_bad_images``)."""
    value = cfg.config.data.unlabeled
    if value is None:
        return None
    if "unlabeled" not in cfg.memo:
        cfg.memo["unlabeled"] = _shards(cfg, value) if looks_like_shards(value) else _files(cfg, cfg.resolve(value))
    return cfg.memo["unlabeled"]


def _shards(cfg: LoadedConfig, pattern: str) -> Unlabeled:
    shards = expand_shards(cfg, pattern)
    for p in shards:
        if not p.exists():
            raise ConfigError(KEY, f"{p}: shard not found", cfg.source)
        check_shard(p)
    return Unlabeled(None, shards=shards)


def _files(cfg: LoadedConfig, path: Path) -> Unlabeled:
    if not path.exists():
        raise ConfigError(KEY, f"{path} does not exist", cfg.source)
    if path.is_dir():
        images = (f for f in path.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
        paths = sorted(f.relative_to(path).as_posix() for f in images)
        if not paths:
            raise ConfigError(KEY, f"no images under {path}", cfg.source)
        return Unlabeled(path, paths)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        raise ConfigError(KEY, f"{path} is one image; give a folder of images or a list file of paths", cfg.source)
    return _list_file(cfg, path)


def _list_file(cfg: LoadedConfig, path: Path) -> Unlabeled:
    """One image path a line (or a CSV's first column), relative to the list file; an optional ``path`` header."""
    skipped: list[str] = []
    paths: list[str] = []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UsageError(f"{path}: not a readable list file of image paths ({exc})") from None
    for line, row in enumerate(rows, 1):
        name = row[0].strip() if row else ""
        if not name or name.startswith("#") or (line == 1 and name.lower() in ("path", "file", "filename", "image")):
            continue
        if not (path.parent / name).is_file():
            message = f"{path}:{line}: {path.parent / name} does not exist"
            if not cfg.config.data.skip_bad_images:
                raise UsageError(f"{message}; {SKIP_HINT}")
            skipped.append(message)
            continue
        paths.append(name)
    if not paths:
        raise ConfigError(KEY, f"{path}: no images listed", cfg.source)
    return Unlabeled(path.parent, paths, skipped=skipped)


def fingerprint(cfg: LoadedConfig, content_digest: Callable[[Path], str] | None = None) -> dict[str, Any] | None:
    """One digest of the unlabelled images (relative path, size and mtime of each file, or with ``content_digest``
    its bytes' sha256; shards by size and mtime, as the dataset's are); None when ``data.unlabeled`` is not set."""
    found = listing(cfg)
    if found is None:
        return None
    h = hashlib.sha256()
    files = [(p.name, p) for p in found.shards] if found.shards else [(rel, found.root / rel) for rel in found.paths]
    for name, path in files:  # type: ignore[operator]
        if content_digest is not None and not found.shards:
            what = content_digest(path)
        else:
            st = path.stat()
            what = f"{st.st_size}:{st.st_mtime_ns}"
        h.update(f"{name}\t{what}\n".encode())
    return {"files": len(files), "skipped": len(found.skipped), "digest": h.hexdigest()}


def keep_labels(
    labels: np.ndarray, rows: np.ndarray, per_class: int, seed: int, classes: list[str], source: str
) -> np.ndarray:
    """The rows (of the training split's ``rows``) whose labels ``data.labels_per_class`` keeps: per class, the
    first ``per_class`` of that class in a permutation of ``rows`` seeded by ``seed`` (``data.seed``). A class with
    fewer training images is one line naming it."""
    import numpy as np

    rows = np.asarray(rows)
    have = labels[rows]
    counts = np.bincount(have[have >= 0], minlength=len(classes))
    short = [i for i, n in enumerate(counts) if n < per_class]
    if short:
        c = short[0]
        raise ConfigError(
            "data.labels_per_class",
            f"{per_class} labels per class, but class '{classes[c]}' has {counts[c]} training images (after the "
            "val split); lower it",
            source,
        )
    order = np.random.default_rng([seed, 0x1ABE1]).permutation(len(rows))
    order = order[have[order] >= 0]
    by_class = order[np.argsort(have[order], kind="stable")]  # each class's rows in permutation order
    starts = np.searchsorted(have[by_class], np.arange(len(classes)))
    picked = np.concatenate([by_class[s : s + per_class] for s in starts])
    return np.sort(rows[picked])


def without_labels(labels: np.ndarray, rows: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """A copy of ``labels`` in which the training ``rows`` not in ``keep`` are :data:`UNLABELED`."""
    import numpy as np

    out = labels.copy()
    out[np.setdiff1d(rows, keep)] = UNLABELED
    return out


def check_val(labels: Any, where: str) -> None:
    """Selection needs labels: a validation split without a labelled image is one line."""
    if len(labels) == 0 or int((labels >= 0).sum()) == 0:
        raise UsageError(
            f"{where}: no labelled validation images (model selection needs them); add labelled images or raise "
            "data.val_fraction"
        )
