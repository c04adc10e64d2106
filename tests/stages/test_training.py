"""A killed run resumes from its last completed epoch and ends with the same weights."""

import pytest
import torch

from pipeline.config import TrainConfig, load_config
from pipeline.data import load_dataset, make_splits
from pipeline.training import CHECKPOINT, fit
from pipeline.zoo import create_model


class Killed(Exception):
    pass


def _fit(splits, cfg, work_dir, kill_at_step=None):
    torch.manual_seed(0)
    model = create_model("tiny_cnn", num_classes=4, in_channels=1)
    calls = {"n": 0}

    def loss_fn(batch):
        calls["n"] += 1
        if calls["n"] == kill_at_step:
            raise Killed
        return torch.nn.functional.cross_entropy(model(batch.x), batch.y)

    conf = TrainConfig(epochs=3, batch_size=32, lr=0.05, seed=3)
    result = fit(
        model=model, trainable=model, loss_fn=loss_fn, splits=splits, conf=conf,
        augment=cfg.config.data.augment, work_dir=work_dir, device=torch.device("cpu"), desc="t", progress=False,
        log=lambda s: None,
    )  # fmt: skip
    return model, result, calls["n"]


def test_resume_after_kill_matches_uninterrupted_run(write_config, tmp_path):
    cfg = load_config(write_config())
    data = load_dataset(cfg)
    splits = make_splits(cfg, data)
    straight, res_a, _ = _fit(splits, cfg, tmp_path / "a")

    work = tmp_path / "b"
    with pytest.raises(Killed):
        _fit(splits, cfg, work, kill_at_step=8)  # mid second epoch (173 images: 6 steps an epoch)
    assert (work / CHECKPOINT).is_file()
    resumed, res_b, steps = _fit(splits, cfg, work)
    assert steps == 12  # epochs 2 and 3 only
    for k, v in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, rtol=0, atol=0)
    assert res_a["best_epoch"] == res_b["best_epoch"]
    assert [h["val_top1"] for h in res_a["history"]] == [h["val_top1"] for h in res_b["history"]]


def test_splits_are_disjoint_and_seeded(write_config):
    cfg = load_config(write_config({"data": {"train_subset": 50}}))
    data = load_dataset(cfg)
    a, b = make_splits(cfg, data), make_splits(cfg, data)
    assert torch.equal(a.train_idx, b.train_idx) and len(a.train_idx) == 50
    assert not set(a.train_idx.tolist()) & set(a.val_idx.tolist())
    assert len(a.val_idx) == round(192 * 0.1)
