"""Cached teacher features: the stored signals equal an online teacher's on the same augmented view."""

import numpy as np
import torch

from kdpipe.config import load_config
from kdpipe.ml.data.memory import Augment, apply_params, load_dataset, make_splits, make_view_table, train_batches
from kdpipe.ml.models.loading import load_teacher
from kdpipe.ml.models.split import split_model
from kdpipe.runner import read_last_run, run_pipeline
from kdpipe.stages.features import CachedTeacher


def test_view_zero_is_the_plain_image_and_views_replay():
    conf = Augment(random_crop_padding=2, horizontal_flip=True)
    table = make_view_table(50, 3, conf, seed=0)
    x = torch.randint(0, 255, (50, 1, 8, 8), dtype=torch.uint8)
    plain = apply_params(x, table.oy[:, 0], table.ox[:, 0], table.flip[:, 0], conf)
    assert torch.equal(plain, x)
    assert table.flip[:, 1:].any() and (table.oy[:, 1:] != 2).any()  # the other views are augmented
    again = make_view_table(50, 3, conf, seed=0)
    assert torch.equal(again.oy, table.oy) and torch.equal(again.flip, table.flip)


def test_cached_signals_match_the_online_teacher(write_config):
    cfg = load_config(write_config({"features": {"enabled": True, "views": 2, "batch_size": 64}}))
    run_pipeline(cfg, until="features", echo=lambda s: None)
    keys = {n: s["key"] for n, s in read_last_run(cfg)["stages"].items()}
    cached = CachedTeacher(cfg.cache_dir / "features" / keys["features"], torch.device("cpu"))
    assert cached.info["views"] == 2 and cached.info["storage_max_rel_error"] < 1e-2

    data = load_dataset(cfg)
    splits = make_splits(cfg, data)
    teacher, spec = load_teacher(cfg.cache_dir / "teacher" / keys["teacher"])
    t = split_model(teacher, torch.zeros(2, *data.input_shape), spec["feature_node"])
    batch = next(train_batches(splits, 16, seed=0, epoch=0, conf=cfg.config.data.augment, views=cached.views))
    assert batch.view is not None and set(batch.view.tolist()) <= {0, 1}
    signals = cached(batch)
    with torch.no_grad():
        features = t.body.eval()(batch.x)
        logits = t.head.eval()(features)
    torch.testing.assert_close(signals["features"], features, atol=2e-2, rtol=1e-2)  # fp16 storage
    torch.testing.assert_close(signals["logits"], logits, atol=1e-4, rtol=1e-4)
    assert np.load(cfg.cache_dir / "features" / keys["features"] / "features.npy", mmap_mode="r").dtype == np.float16
