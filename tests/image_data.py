"""Tiny image datasets on disk for the data-path tests: an ImageFolder of JPEGs, the same images as CSV
list files and as WebDataset shards."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np

CLASSES = ("ant", "bee", "cat")


def make_imagefolder(root: Path, train: int = 16, test: int = 4, size: int = 20, seed: int = 0) -> Path:
    """``root/{train,test}/<class>/<i>.jpg``: each class a colour, plus noise (learnable in one epoch)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", train), ("test", test)):
        for c, cls in enumerate(CLASSES):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                a = rng.integers(0, 120, (size, size, 3), dtype=np.uint8)
                a[..., c] += 120
                Image.fromarray(a).save(folder / f"{i}.jpg", quality=90)
    return root


def write_lists(root: Path, named: bool = False) -> dict[str, str]:
    """CSV list files (`path,label` or `path,class_name`) of an ImageFolder tree, beside it."""
    out = {}
    for split in ("train", "test"):
        rows = [
            f"{p.relative_to(root).as_posix()},{p.parent.name if named else CLASSES.index(p.parent.name)}"
            for p in sorted((root / split).rglob("*.jpg"))
        ]
        (root / f"{split}.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
        out[split] = f"{split}.csv"
    return out


def write_shards(root: Path, out: Path, per_shard: int = 20) -> dict[str, str]:
    """WebDataset tar shards (``<key>.jpg`` + ``<key>.cls``) of an ImageFolder tree; brace patterns per split."""
    out.mkdir(parents=True, exist_ok=True)
    patterns = {}
    for split in ("train", "test"):
        files = sorted((root / split).rglob("*.jpg"))
        chunks = [files[i : i + per_shard] for i in range(0, len(files), per_shard)]
        for s, chunk in enumerate(chunks):
            with tarfile.open(out / f"{split}-{s:03d}.tar", "w") as tar:
                for p in chunk:
                    key = f"{p.parent.name}_{p.stem}"
                    for name, data in (
                        (f"{key}.jpg", p.read_bytes()),
                        (f"{key}.cls", str(CLASSES.index(p.parent.name)).encode()),
                    ):
                        info = tarfile.TarInfo(name)
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
        patterns[split] = str(out / f"{split}-{{000..{len(chunks) - 1:03d}}}.tar")
    return patterns
