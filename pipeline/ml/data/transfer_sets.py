"""Transfer sets on disk: a few training images per class in an ordinary ImageFolder tree, with provenance.

``kdpipe condense`` writes one (:func:`write_transfer_set`); a run trains on one with ``data.transfer_set:
FOLDER`` (the dataset's own val and test splits stay). The layout is what torchvision's ImageFolder reads::

    FOLDER/<i>_<class name>/<n>.png     uint8 PNG, the dataset's channels and size
    FOLDER/provenance.json             how it was made, and the sha256 of every image file

Class folders are prefixed with the class index, zero-padded, so their sorted order is the label order
(and a class name with a ``/`` in it, like Fashion-MNIST's ``T-shirt/top``, still names one folder).
When the folder has a ``provenance.json``, a run checks every image against it (through the
:class:`~kdpipe.fileio.FileDigests` memo, so a re-run does not re-read unchanged files) before any stage: an
edited, removed or added image is one line naming the file. No torch here: ``kdpipe status`` plans with it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kdpipe.errors import ConfigError, UsageError
from kdpipe.fileio import FileDigests, atomic_write_json, sha256_file

PROVENANCE = "provenance.json"
FORMAT = "kdpipe-transfer-set/1"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}


def class_folder(index: int, name: str, num_classes: int) -> str:
    """``<index>_<name>``: the index zero-padded to the widest one, the name without path separators."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "class"
    return f"{index:0{len(str(max(0, num_classes - 1)))}d}_{safe}"


@dataclass
class TransferSet:
    """A transfer set's images (relative paths, in class then file order) and labels, and its provenance."""

    folder: Path
    paths: list[str]
    labels: list[int]
    provenance: dict[str, Any] | None

    def per_class(self, num_classes: int) -> list[int]:
        return np.bincount(np.asarray(self.labels, dtype=np.int64), minlength=num_classes).tolist()


def _images_under(folder: Path) -> list[str]:
    return sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )


def read_provenance(folder: Path) -> dict[str, Any] | None:
    """The folder's provenance.json, or None when it has none; a damaged one is one line naming it."""
    path = folder / PROVENANCE
    if not path.exists():
        return None
    try:
        prov = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path}: not readable JSON ({exc})") from None
    files = prov.get("files") if isinstance(prov, dict) else None
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise UsageError(f"{path}: no `files` mapping of image path to sha256; not a kdpipe transfer set")
    return prov


def open_transfer_set(cfg: Any, classes: list[str], memo: FileDigests | None = None) -> TransferSet:
    """``data.transfer_set`` listed and checked: the folder exists, its class folders are the dataset's classes,
    and (with a provenance.json) every image's sha256 is the recorded one. ``memo`` remembers digests across
    runs; without one each file is hashed."""
    folder = transfer_folder(cfg)
    prov = read_provenance(folder)
    if prov is not None:
        verify(folder, prov, memo)
    by_name = {}
    for i, name in enumerate(classes):
        by_name[class_folder(i, name, len(classes))] = i
        by_name.setdefault(name, i)  # a plain class-name folder (a hand-made transfer set)
    paths, labels = [], []
    folders = sorted(p for p in folder.iterdir() if p.is_dir())
    for sub in folders:
        if sub.name not in by_name:
            expected = ", ".join(class_folder(i, n, len(classes)) for i, n in enumerate(classes[:3]))
            raise ConfigError(
                "data.transfer_set",
                f"{sub}: not a class of the dataset (class folders are named like {expected}, ...)",
                cfg.source,
            )
        files = _images_under(sub)
        paths += [f"{sub.name}/{f}" for f in files]
        labels += [by_name[sub.name]] * len(files)
    loose = [f for f in _images_under(folder) if "/" not in f]
    if loose:
        raise ConfigError("data.transfer_set", f"{folder / loose[0]}: an image outside the class folders", cfg.source)
    if not paths:
        raise ConfigError("data.transfer_set", f"no images under {folder}/<class>/", cfg.source)
    return TransferSet(folder, paths, labels, prov)


def transfer_folder(cfg: Any) -> Path:
    folder = cfg.resolve(cfg.config.data.transfer_set or "")
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        hint = "" if folder.exists() else f" (make one with `kdpipe condense -c CONFIG --per-class N -o {folder}`)"
        raise ConfigError("data.transfer_set", f"{folder} {what}{hint}", cfg.source)
    return folder


def verify(folder: Path, prov: dict[str, Any], memo: FileDigests | None = None) -> None:
    """Every image listed in ``prov`` exists with its sha256, and no other image is in the folder."""
    digest = memo.file if memo is not None else sha256_file
    listed = prov["files"]
    for rel, sha in sorted(listed.items()):
        path = folder / rel
        if not path.is_file():
            raise UsageError(f"{path}: listed in {folder / PROVENANCE} but missing; the transfer set is damaged")
        if digest(path) != sha:
            raise UsageError(
                f"{path}: sha256 differs from {folder / PROVENANCE} (the image was edited or damaged); "
                "re-create the transfer set with `kdpipe condense`"
            )
    extra = [rel for rel in _images_under(folder) if rel not in listed]
    if extra:
        raise UsageError(f"{folder / extra[0]}: not listed in {folder / PROVENANCE}; remove it or re-create the set")


def fingerprint(cfg: Any, memo: FileDigests) -> dict[str, Any]:
    """What a run's cache key holds of ``data.transfer_set``: one digest of its images' paths and content, checked
    against its provenance.json first when it has one (a damaged set stops the run here, before any stage)."""
    folder = transfer_folder(cfg)
    prov = read_provenance(folder)
    if prov is not None:
        verify(folder, prov, memo)
    files = sorted(prov["files"].items()) if prov else [(rel, memo.file(folder / rel)) for rel in _images_under(folder)]
    if not files:
        raise ConfigError("data.transfer_set", f"no images under {folder}/<class>/", cfg.source)
    h = hashlib.sha256()
    for rel, sha in files:
        h.update(f"{rel}\t{sha}\n".encode())
    return {"images": len(files), "digest": h.hexdigest(), "provenance": prov is not None}


def read_images(found: TransferSet, shape: tuple[int, int, int]) -> np.ndarray:
    """Every image as uint8 (N, C, H, W); one of another size or channel count is one line naming it."""
    from PIL import Image

    c, h, w = shape
    out = np.empty((len(found.paths), c, h, w), dtype=np.uint8)
    for i, rel in enumerate(found.paths):
        path = found.folder / rel
        try:
            with Image.open(path) as im:
                if im.size != (w, h):
                    raise UsageError(f"{path}: a {im.size[0]}x{im.size[1]} image, the dataset's are {w}x{h}")
                pixels = np.asarray(im.convert("L" if c == 1 else "RGB"))
        except UsageError:
            raise
        except Exception as exc:  # PIL raises many types; every one means "this image is bad"
            raise UsageError(f"{path}: unreadable image ({exc})") from None
        out[i] = pixels[None] if c == 1 else pixels.transpose(2, 0, 1)
    return out


def check_output(out: Path, force: bool) -> None:
    """An output folder that may be written: new, or (with ``force``) an existing folder to replace."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: a file, not a folder; choose another output folder")
    if out.exists() and not force:
        raise UsageError(f"{out}: already exists; choose another folder or pass --force to replace it")


@contextmanager
def staging(out: Path, force: bool) -> Iterator[Path]:
    """A temporary folder beside ``out`` that replaces it when the block completes and is removed when the block
    raises (an interrupt included): ``out`` is never half-written. An existing ``out`` is refused unless
    ``force``; then it is swapped out only once the new one is complete."""
    out = Path(out)
    check_output(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / "replaced")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_transfer_set(
    out: Path,
    images: np.ndarray,
    labels: np.ndarray,
    classes: list[str],
    provenance: dict[str, Any],
    force: bool = False,
    on_image: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Write ``images`` (uint8 N×C×H×W) as ``out/<class folder>/<n>.png`` and ``provenance.json`` (``provenance``
    plus the format, the class folders and every image's sha256), atomically (:func:`staging`); returns what
    provenance.json holds."""
    from PIL import Image

    labels = np.asarray(labels)
    with staging(out, force) as tmp:
        files: dict[str, str] = {}
        width = len(str(max(1, int(np.bincount(labels).max()) - 1)))
        count = [0] * len(classes)
        for i, (x, y) in enumerate(zip(images, labels, strict=True)):
            folder = class_folder(int(y), classes[int(y)], len(classes))
            rel = f"{folder}/{count[int(y)]:0{width}d}.png"
            count[int(y)] += 1
            (tmp / folder).mkdir(exist_ok=True)
            pixels = x[0] if x.shape[0] == 1 else x.transpose(1, 2, 0)
            Image.fromarray(np.ascontiguousarray(pixels)).save(tmp / rel, format="PNG")
            files[rel] = sha256_file(tmp / rel)
            if on_image is not None:
                on_image(i)
        folders = {class_folder(i, n, len(classes)): n for i, n in enumerate(classes)}
        written = {"format": FORMAT, **provenance, "classes": folders, "files": files}
        atomic_write_json(tmp / PROVENANCE, written)
    return written
