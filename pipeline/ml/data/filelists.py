"""File lists of image datasets (ImageFolder trees, CSV list files, WebDataset shards), their stable
validation split and their one-digest fingerprint. No torch here: `kdpipe status` plans with it.

A dataset of a million photos is a million (relative path, label) rows. They are kept as two numpy
arrays, not a list of Python objects, so DataLoader workers forked from the main process share the
pages instead of copying them as reference counts change.
"""

from __future__ import annotations

import csv
import hashlib
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from kdpipe.config import DataConfig, LoadedConfig
from kdpipe.errors import ConfigError, UsageError

if TYPE_CHECKING:  # numpy is imported where arrays are made: planning a cached run lists no files
    import numpy as np

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SKIP_HINT = "fix or remove it, or set data.skip_bad_images: true"


@dataclass
class FileList:
    """One split's images: paths relative to ``root`` (bytes, numpy) and integer labels."""

    root: Path
    paths: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def path(self, i: int) -> Path:
        return self.root / os.fsdecode(self.paths[i])

    def take(self, index: np.ndarray) -> FileList:
        return FileList(self.root, self.paths[index], self.labels[index])


@dataclass
class Listing:
    """The train and test file lists of a dataset (val too when given on its own), and what was skipped."""

    classes: list[str]
    splits: dict[str, FileList]
    skipped: list[str] = field(default_factory=list)


def configured_root(cfg: LoadedConfig) -> Path:
    """``data.root`` resolved against the config's folder; it must exist (a typo is not "not downloaded yet")."""
    root = cfg.resolve(cfg.config.data.root or "")
    if not root.exists():
        raise ConfigError("data.root", f"{root} does not exist", cfg.source)
    if not root.is_dir():
        raise ConfigError("data.root", f"{root} is a file, not a folder", cfg.source)
    return root


def _bad(cfg: LoadedConfig, skipped: list[str], message: str) -> None:
    """Stop with one line naming the file, or (data.skip_bad_images) remember it and go on."""
    if not cfg.config.data.skip_bad_images:
        raise UsageError(f"{message}; {SKIP_HINT}")
    skipped.append(message)


def _pack(root: Path, rows: list[tuple[str, int]]) -> FileList:
    import numpy as np

    paths = np.array([os.fsencode(p) for p, _ in rows], dtype=np.bytes_) if rows else np.array([], dtype="S1")
    return FileList(root, paths, np.array([label for _, label in rows], dtype=np.int64))


def imagefolder(cfg: LoadedConfig) -> Listing:
    """``root/{train,test}/<class>/**/<image>``; classes are train/'s folder names, sorted."""
    data = cfg.config.data
    if not data.root:
        raise ConfigError("data.root", "imagefolder needs a root folder holding train/ and test/", cfg.source)
    root = configured_root(cfg)
    skipped: list[str] = []
    trees: dict[str, dict[str, list[str]]] = {}
    for split in ("train", "test"):
        folder = root / split
        if not folder.is_dir():
            raise ConfigError("data.root", f"{folder} is not a folder (an ImageFolder tree needs {split}/)", cfg.source)
        tree: dict[str, list[str]] = {}
        for cls in sorted(p for p in folder.iterdir() if p.is_dir()):
            files = sorted(
                f.relative_to(root).as_posix()
                for f in cls.rglob("*")
                if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()
            )
            if not files:
                _bad(cfg, skipped, f"{cls}: empty class folder (no images)")
                continue
            tree[cls.name] = files
        if not tree:
            raise ConfigError("data.root", f"no images under {folder}/<class>/", cfg.source)
        trees[split] = tree
    classes = sorted(trees["train"])
    index = {c: i for i, c in enumerate(classes)}
    splits = {}
    for split, tree in trees.items():
        extra = sorted(set(tree) - set(index))
        if extra:
            raise UsageError(f"{root / split / extra[0]}: class '{extra[0]}' is in {split}/ but not in train/")
        splits[split] = _pack(root, [(f, index[c]) for c, files in tree.items() for f in files])
    return Listing(classes, splits, skipped)


def _read_list(cfg: LoadedConfig, path: Path, skipped: list[str]) -> list[tuple[str, str, int]]:
    """(relative path, label text, line number) rows of a ``path,label`` CSV whose files exist."""
    if not path.is_file():
        raise ConfigError("data.files", f"list file not found: {path}", cfg.source)
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for line, row in enumerate(csv.reader(f), 1):
            if not row or row[0].startswith("#"):
                continue
            if len(row) != 2:
                raise UsageError(f"{path}:{line}: expected `path,label`, got {len(row)} fields")
            name, label = row[0].strip(), row[1].strip()
            if line == 1 and label.lower() in ("label", "class", "class_name"):
                continue  # a header
            if not (path.parent / name).is_file():
                _bad(cfg, skipped, f"{path}:{line}: {path.parent / name} does not exist")
                continue
            rows.append((name, label, line))
    if not rows:
        raise UsageError(f"{path}: no images listed")
    return rows


def filelist(cfg: LoadedConfig) -> Listing:
    """CSV list files of ``path,label`` (integer) or ``path,class_name`` rows, paths relative to each file."""
    data = cfg.config.data
    assert data.files is not None  # the config requires it
    skipped: list[str] = []
    wanted = {"train": data.files.train, "test": data.files.test, **({"val": data.files.val} if data.files.val else {})}
    lists = {split: cfg.resolve(p) for split, p in wanted.items()}
    rows = {split: _read_list(cfg, p, skipped) for split, p in lists.items()}
    numeric = all(label.lstrip("-").isdigit() for r in rows.values() for _, label, _ in r)
    if numeric:
        top = max(int(label) for r in rows.values() for _, label, _ in r)
        classes = list(data.classes) if data.classes else [f"class{i}" for i in range(top + 1)]
        for split, r in rows.items():
            for _, label, line in r:
                if not 0 <= int(label) < len(classes):
                    raise UsageError(f"{lists[split]}:{line}: label {label} is outside 0..{len(classes) - 1}")
        index = {str(i): i for i in range(len(classes))}
    else:
        classes = sorted({label for _, label, _ in rows["train"]})
        index = {c: i for i, c in enumerate(classes)}
        for split, r in rows.items():
            for _, label, line in r:
                if label not in index:
                    raise UsageError(f"{lists[split]}:{line}: class '{label}' is not in the training list")
    splits = {}
    for split, r in rows.items():
        root = lists[split].parent
        splits[split] = _pack(root, [(name, index[str(int(label)) if numeric else label]) for name, label, _ in r])
    return Listing(classes, splits, skipped)


def expand_shards(cfg: LoadedConfig, pattern: str) -> list[Path]:
    """Brace-expanded shard paths (``train-{000..099}.tar``), resolved against the config's folder."""
    from webdataset.shardlists import expand_urls  # braces and `::`-joined lists, as webdataset reads them

    return [cfg.resolve(p) for p in expand_urls(pattern)]


def check_shard(path: Path) -> None:
    if not path.is_file():
        raise UsageError(f"{path}: shard not found")
    if not tarfile.is_tarfile(path):
        raise UsageError(f"{path}: not a tar file (WebDataset shards are tar archives)")


def shard_index(path: Path, labeled: bool = True) -> tuple[list[str], list[int]]:
    """Sample keys and their ``cls`` labels in one shard (reads the headers and the small label members);
    ``labeled=False``: shards of unlabelled samples (``data.unlabeled``), whose labels are -1 and not read."""
    check_shard(path)
    keys: dict[str, int] = {}
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base = member.name.rsplit("/", 1)[-1]
                stem, _, ext = base.partition(".")
                key = member.name[: len(member.name) - len(base)] + stem
                if ext.lower() in ("cls", "label") and labeled:
                    raw = tar.extractfile(member).read()  # type: ignore[union-attr]
                    keys[key] = int(raw.decode().strip())
                else:
                    keys.setdefault(key, -1)
    except (tarfile.TarError, ValueError, OSError) as exc:
        raise UsageError(f"{path}: damaged shard ({exc})") from None
    unlabelled = [k for k, v in keys.items() if v < 0]
    if unlabelled and labeled:
        raise UsageError(f"{path}: sample '{unlabelled[0]}' has no .cls label")
    return list(keys), list(keys.values())


def hash_fraction(seed: int, names: np.ndarray, salt: str = "val") -> np.ndarray:
    """A uniform number in [0, 1) per name from sha256(seed, salt, name): the same on every run and machine,
    and a file keeps its side of the split when others are added or removed."""
    import numpy as np

    prefix = f"{seed}:{salt}:".encode()
    out = np.empty(len(names), dtype=np.float64)
    for i, name in enumerate(names):
        h = hashlib.sha256(prefix + bytes(name)).digest()
        out[i] = int.from_bytes(h[:8], "big") / 2**64
    return out


def split_train(data: DataConfig, train: FileList) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) row indices of the training list: val is every file whose path hashes below
    ``val_fraction``; ``train_subset`` keeps the files with the smallest second hash."""
    import numpy as np

    val = hash_fraction(data.seed, train.paths) < data.val_fraction
    if val.all() or not val.any():  # tiny lists: hold out at least one image and keep at least one
        order = np.argsort(hash_fraction(data.seed, train.paths))
        val = np.zeros(len(train), dtype=bool)
        val[order[: max(1, min(len(train) - 1, round(len(train) * data.val_fraction)))]] = True
    train_idx = np.flatnonzero(~val)
    if data.train_subset is not None and data.train_subset < len(train_idx):
        rank = hash_fraction(data.seed, train.paths[train_idx], "subset")
        train_idx = np.sort(train_idx[np.argsort(rank)[: data.train_subset]])
    return train_idx, np.flatnonzero(val)


def list_digest(cfg: LoadedConfig, listing: Listing, content_digest=None) -> dict[str, object]:
    """ONE digest of the file lists: relative path, label, size and mtime of every file (or, with
    ``content_digest``, its bytes' sha256). Metadata stays the same size whatever the number of files."""
    h = hashlib.sha256()
    h.update(("\n".join(listing.classes) + "\n\n").encode())
    count = 0
    for split in sorted(listing.splits):
        files = listing.splits[split]
        for rel, label in zip(files.paths, files.labels, strict=True):
            path = files.root / os.fsdecode(rel)
            if content_digest is not None:
                what = content_digest(path)
            else:
                st = path.stat()
                what = f"{st.st_size}:{st.st_mtime_ns}"
            h.update(b"%s\t%s\t%d\t%s\n" % (split.encode(), bytes(rel), int(label), what.encode()))
            count += 1
    return {"files": count, "skipped": len(listing.skipped), "digest": h.hexdigest()}
