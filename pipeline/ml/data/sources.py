"""Where dataset files are, and their fingerprint. No torch here: `kdpipe status` uses it."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from kdpipe.config import DataConfig, LoadedConfig
from kdpipe.errors import ConfigError, UsageError
from kdpipe.fileio import FileDigests
from kdpipe.ml.data import filelists
from kdpipe.ml.data.filelists import configured_root
from kdpipe.ml.data.unlabeled import fingerprint as fingerprint_unlabeled

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
CIFAR_DIRS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


def _fashion_files(folder: Path) -> dict[str, Path] | None:
    """The four IDX files (gzipped or not) in ``folder`` or its torchvision layout, or None."""
    for base in (folder, folder / "FashionMNIST" / "raw", folder / "fashion-mnist"):
        found = {}
        for name in FASHION_FILES:
            for candidate in (base / f"{name}.gz", base / name):
                if candidate.is_file():
                    found[name] = candidate
                    break
        if len(found) == len(FASHION_FILES):
            return found
    return None


def default_download_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kdpipe" / "data"


def locate_fashion_mnist(cfg: LoadedConfig) -> dict[str, Path]:
    """Configured root → $KDPIPE_DATA → Debian's dataset-fashion-mnist → torchvision download."""
    data = cfg.config.data
    tried: list[str] = []
    candidates: list[Path] = []
    if data.root:  # a configured root is the only place looked in: falling back elsewhere would hide a typo
        candidates.append(configured_root(cfg))
    else:
        if os.environ.get("KDPIPE_DATA"):
            env = Path(os.environ["KDPIPE_DATA"]).expanduser()
            if not env.is_dir():  # set on purpose: a typo must not fall through to other data
                raise UsageError(f"KDPIPE_DATA={env}: no such folder; fix it or unset it")
            candidates.append(env)
        candidates.append(DEBIAN_FASHION_MNIST)
        candidates.append(default_download_root())
    for folder in candidates:
        tried.append(str(folder))
        found = _fashion_files(folder)
        if found:
            return found
    if data.download:
        target = configured_root(cfg) if data.root else default_download_root()
        try:
            from torchvision.datasets import FashionMNIST

            FashionMNIST(str(target), train=True, download=True)
            FashionMNIST(str(target), train=False, download=True)
        except Exception as exc:
            tried.append(f"download into {target} ({type(exc).__name__})")
        else:
            found = _fashion_files(target)
            if found:
                return found
    if data.root:
        raise ConfigError(
            "data.root", f"{tried[0]} does not hold the four Fashion-MNIST *-ubyte(.gz) files", cfg.source
        )
    raise UsageError(
        "Fashion-MNIST not found (looked in: " + "; ".join(tried) + "). "
        "Install it with `apt-get install dataset-fashion-mnist`, or set data.root or $KDPIPE_DATA "
        "to a folder holding the four *-ubyte.gz files."
    )


def locate_cifar(cfg: LoadedConfig) -> Path:
    data = cfg.config.data
    root = configured_root(cfg) if data.root else default_download_root()
    folder = root / CIFAR_DIRS[data.dataset]
    if not folder.is_dir() and data.download:
        try:
            from torchvision import datasets

            cls = datasets.CIFAR10 if data.dataset == "cifar10" else datasets.CIFAR100
            cls(str(root), train=True, download=True)
        except Exception as exc:
            raise UsageError(
                f"{data.dataset} not found in {root} and the download failed ({type(exc).__name__}); "
                f"put the extracted '{CIFAR_DIRS[data.dataset]}' folder there or set data.root"
            ) from None
    if not folder.is_dir():
        raise UsageError(f"{data.dataset} not found: no {folder}; set data.root or data.download: true")
    return folder


def listing(cfg: LoadedConfig) -> filelists.Listing:
    """The file lists of an image dataset (imagefolder or filelist), walked once per loaded config: the
    fingerprint, the streaming decision, the image-size checks and the loading all use the same listing."""
    if "listing" not in cfg.memo:
        lister = filelists.filelist if cfg.config.data.dataset == "filelist" else filelists.imagefolder
        cfg.memo["listing"] = lister(cfg)
    return cfg.memo["listing"]


def dataset_fingerprint(cfg: LoadedConfig, memo: FileDigests) -> dict[str, Any]:
    """A fingerprint of the dataset's files (and of ``data.unlabeled``'s, and of ``data.transfer_set``'s, checked
    against its provenance.json): it changes when their content does."""
    found = _dataset_fingerprint(cfg, memo)
    unlabeled = fingerprint_unlabeled(cfg, memo.file if cfg.config.data.fingerprint == "content" else None)
    if unlabeled is not None:  # data.unlabeled's images, listed (and checked) before any stage
        found = {**found, "unlabeled": unlabeled}
    if cfg.config.data.transfer_set is None:
        return found
    from kdpipe.ml.data.transfer_sets import fingerprint

    return {**found, "transfer_set": fingerprint(cfg, memo)}


def _dataset_fingerprint(cfg: LoadedConfig, memo: FileDigests) -> dict[str, Any]:
    data: DataConfig = cfg.config.data
    if data.dataset == "synthetic":
        return {"dataset": "synthetic"}  # fully described by data.synthetic, which is in the key
    if data.dataset == "fashion_mnist":
        files = locate_fashion_mnist(cfg)
        return {"dataset": data.dataset, "files": {n: memo.file(p) for n, p in sorted(files.items())}}
    if data.dataset in CIFAR_DIRS:
        folder = locate_cifar(cfg)
        return {
            "dataset": data.dataset,
            "files": {p.name: memo.file(p) for p in sorted(folder.iterdir()) if p.is_file()},
        }
    if data.dataset == "webdataset":
        assert data.shards is not None
        shards = sorted({p for part in (data.shards.train, data.shards.val, data.shards.test) if part
                         for p in filelists.expand_shards(cfg, part)})  # fmt: skip
        for p in shards:
            filelists.check_shard(p)
        digest = hashlib.sha256()
        for p in shards:
            what = memo.file(p) if data.fingerprint == "content" else f"{p.stat().st_size}:{p.stat().st_mtime_ns}"
            digest.update(f"{p.name}\t{what}\n".encode())
        return {"dataset": data.dataset, "files": len(shards), "digest": digest.hexdigest()}
    found = listing(cfg)
    return {
        "dataset": data.dataset,
        "mode": data.fingerprint,
        **filelists.list_digest(cfg, found, memo.file if data.fingerprint == "content" else None),
    }
