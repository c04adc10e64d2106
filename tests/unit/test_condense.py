"""Distribution matching, its siamese augmentation and transfer sets on disk, on tiny tensors (seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kdpipe.config import load_config
from kdpipe.errors import ConfigError, UsageError
from kdpipe.fileio import sha256_file
from kdpipe.ml.data import condense as dm
from kdpipe.ml.data import dsa
from kdpipe.ml.data import transfer_sets as ts
from kdpipe.ml.data.memory import load_dataset, make_splits


@pytest.fixture(scope="module")
def tiny():
    """The tiny synthetic dataset's train split: 4 classes of 12x12 grayscale images."""
    cfg = load_config(None, ["data.dataset=synthetic"])
    data = load_dataset(cfg)
    splits = make_splits(cfg, data)
    return data.train_x[splits.train_idx], data.train_y[splits.train_idx], data.mean, data.std


def matching_loss(images: torch.Tensor, tiny, nets: int = 6) -> float:
    """The DM objective of uint8 ``images`` (class by class, equal counts) under fixed random nets, no augmentation:
    the same yardstick for the starting images and the condensed ones."""
    x, y, mean, std = tiny
    norm = lambda u8: (u8.float() / 255 - mean[0]) / std[0]  # noqa: E731
    real = [norm(x[y == c]) for c in range(4)]
    syn = list(norm(images).split(len(images) // 4))
    total = 0.0
    for seed in range(nets):
        torch.manual_seed(1000 + seed)
        net = dm.ConvNet(1, 16, 3)
        with torch.no_grad():
            total += float(dm.dm_loss(net, real, syn, None, torch.Generator()))
    return total / nets


def test_dm_loss_decreases_on_a_tiny_set(tiny):
    x, y, mean, std = tiny
    settings = dm.DMSettings(per_class=2, iterations=40, width=16, real_batch=64, lr=3.0, dsa=False)
    start = dm.condense(x, y, 4, dm.DMSettings(**{**settings.as_dict(), "iterations": 0}), mean, std)
    seen: list[float] = []
    done = dm.condense(x, y, 4, settings, mean, std, step=lambda i, loss: seen.append(loss))
    assert len(seen) == 40 and done.losses == seen
    assert torch.equal(done.start, start.start) and torch.equal(done.labels, start.labels)
    assert matching_loss(done.images, tiny) < 0.9 * matching_loss(start.images, tiny)
    assert np.mean(seen[-10:]) < np.mean(seen[:10])


def test_zero_iterations_keep_the_random_real_images(tiny):
    x, y, mean, std = tiny
    out = dm.condense(x, y, 4, dm.DMSettings(per_class=3, iterations=0), mean, std)
    assert out.images.dtype == torch.uint8 and out.images.shape == (12, 1, 12, 12)
    assert torch.equal(out.images, x[out.start])  # exactly: pixels survive the float round trip
    assert out.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert torch.equal(y[out.start], out.labels)
    other = dm.condense(x, y, 4, dm.DMSettings(per_class=3, iterations=0, seed=1), mean, std)
    assert not torch.equal(other.start, out.start)


def test_condensed_pixels_stay_in_range(tiny):
    x, y, mean, std = tiny
    out = dm.condense(x, y, 4, dm.DMSettings(per_class=1, iterations=5, lr=100.0, width=8, real_batch=8), mean, std)
    assert out.images.dtype == torch.uint8
    assert (out.images == 0).any() or (out.images == 255).any()  # a huge step hits the clip, never wraps


@pytest.mark.parametrize("op", dsa.OPS)
def test_dsa_is_siamese_and_differentiable(op):
    aug = dsa.DSA(ops=(op,))
    a = torch.randn(3, 2, 10, 10, requires_grad=True)
    b = torch.randn(5, 2, 10, 10)
    for seed in range(20):  # some draws are the identity (no flip); one that is not must appear
        p = aug.sample(1, (2, 10, 10), torch.Generator().manual_seed(seed))
        both = aug.apply(torch.cat([a, b]), p)
        assert torch.allclose(both[:3], aug.apply(a, p), atol=1e-6)  # the same transform, whatever the batch
        assert torch.allclose(both[3:], aug.apply(b, p), atol=1e-6)
        if not torch.allclose(both[:3], a):
            break
    else:
        pytest.fail(f"{op}: 20 draws left the images unchanged")
    aug.apply(a, p).sum().backward()
    assert a.grad is not None and a.grad.abs().sum() > 0


def test_dsa_crop_translates_and_flip_mirrors():
    aug = dsa.DSA()
    x = torch.arange(16.0).view(1, 1, 4, 4)
    shifted = aug.apply(x, {"op": "crop", "dy": torch.tensor([0]), "dx": torch.tensor([1])})
    assert torch.equal(shifted[0, 0, :, 1:], x[0, 0, :, :3]) and (shifted[0, 0, :, 0] == 0).all()
    assert torch.equal(aug.apply(x, {"op": "flip", "flip": torch.tensor([True])}), x.flip(3))
    per_image = aug(torch.randn(8, 1, 6, 6), torch.Generator().manual_seed(0))
    assert per_image.shape == (8, 1, 6, 6)


def test_too_few_images_of_a_class_names_it():
    y = torch.tensor([0, 0, 0, 1, 2, 2, 2, 3])
    with pytest.raises(UsageError, match=r"^x: class 'b' has 1 training image, fewer than --per-class 3 \(1 more"):
        dm.check_enough(y, ["a", "b", "c", "d"], 3, "x")
    dm.check_enough(y, ["a", "b", "c", "d"], 1, "x")


def write_set(tmp_path: Path, name: str = "set", **kw) -> tuple[Path, dict]:
    images = np.random.default_rng(0).integers(0, 256, size=(6, 1, 5, 5), dtype=np.uint8)
    labels = np.array([0, 0, 1, 1, 2, 2])
    written = ts.write_transfer_set(tmp_path / name, images, labels, ["T-shirt/top", "b", "c"], {"seed": 3}, **kw)
    return tmp_path / name, written


def test_transfer_set_is_an_image_folder_with_provenance(tmp_path):
    folder, written = write_set(tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == ["0_T-shirt_top", "1_b", "2_c", "provenance.json"]
    assert json.loads((folder / "provenance.json").read_text()) == written
    assert written["seed"] == 3 and written["classes"]["0_T-shirt_top"] == "T-shirt/top"
    assert sorted(written["files"]) == [f"{c}/{n}.png" for c in ("0_T-shirt_top", "1_b", "2_c") for n in (0, 1)]
    for rel, sha in written["files"].items():
        assert sha256_file(folder / rel) == sha
    ts.verify(folder, written)


def test_edited_missing_or_added_images_are_named(tmp_path):
    folder, written = write_set(tmp_path)
    target = folder / "1_b" / "0.png"
    target.write_bytes(target.read_bytes() + b"\0")
    with pytest.raises(UsageError, match=r"1_b/0\.png: sha256 differs"):
        ts.verify(folder, written)
    target.unlink()
    with pytest.raises(UsageError, match=r"1_b/0\.png: listed in .* but missing"):
        ts.verify(folder, written)
    folder, written = write_set(tmp_path, "other")
    (folder / "2_c" / "9.png").write_bytes((folder / "2_c" / "0.png").read_bytes())
    with pytest.raises(UsageError, match=r"2_c/9\.png: not listed"):
        ts.verify(folder, written)


def test_an_interrupted_write_leaves_nothing(tmp_path):
    def interrupt(i: int) -> None:
        if i == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_set(tmp_path, on_image=interrupt)
    assert list(tmp_path.iterdir()) == []
    folder, first = write_set(tmp_path)
    with pytest.raises(KeyboardInterrupt):  # replacing with --force: the old set stays whole until the new one is
        write_set(tmp_path, force=True, on_image=interrupt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]
    ts.verify(folder, first)
    with pytest.raises(UsageError, match="already exists"):
        write_set(tmp_path)


def test_transfer_set_config_combinations():
    for sets, message in (
        (["data.transfer_set=x", "data.train_subset=10"], "train_subset"),
        (["data.transfer_repeats=3"], "transfer_repeats is for data.transfer_set"),
        (["data.transfer_set=x", "data.dataset=imagefolder", "data.in_memory=false"], "needs the dataset in memory"),
        (["data.augment.dsa=true", "features.enabled=true"], "features.enabled: false"),
        (["data.augment.dsa=true", "data.dataset=imagefolder", "data.recipe=imagenet"], "this dataset streams"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_config(None, sets)


def test_dsa_training_batches_are_seeded_and_transformed():
    from kdpipe.ml.data.memory import train_batches

    cfg = load_config(None, ["data.dataset=synthetic", "data.augment.random_crop_padding=0"])
    data = load_dataset(cfg)
    splits = make_splits(cfg, data)
    plain = cfg.config.data.augment.model_copy(update={"horizontal_flip": False})
    with_dsa = plain.model_copy(update={"dsa": True})
    first = [b.x for b in train_batches(splits, 32, 0, 1, with_dsa)]
    again = [b.x for b in train_batches(splits, 32, 0, 1, with_dsa)]
    bare = [b.x for b in train_batches(splits, 32, 0, 1, plain)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))  # a pure function of (seed, epoch)
    changed = sum(not torch.allclose(a, b) for a, b in zip(first, bare, strict=True))
    assert changed >= len(first) // 2  # flips of some batches may draw "no flip" for all; most batches change


def test_the_command_defaults_are_the_settings_defaults():
    from kdpipe.cli import condense as command

    defaults = {p.name: p.default for p in command.params}
    settings = dm.DMSettings(per_class=1)
    for name in ("iterations", "lr", "real_batch", "width", "seed"):
        assert defaults[name] == getattr(settings, name), name
    assert settings.dsa  # --no-dsa turns it off
