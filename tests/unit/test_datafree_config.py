"""``distill.data``/``distill.datafree`` in the cache keys and the checks before any stage: real-data keys stay what
they were, a synthetic run's features stage is the disabled one, and a run without validation images is refused."""

from __future__ import annotations

import pytest

from kdpipe.config import load_config
from kdpipe.errors import ConfigError
from kdpipe.stages import datafree
from kdpipe.stages.distill import DistillStage
from kdpipe.stages.features import FeaturesStage


def test_real_data_keys_leave_the_data_free_settings_out(write_config):
    real = DistillStage().config(load_config(write_config({"distill": {"datafree": {"z_dim": 7}}})))
    assert "data" not in real["distill"] and "datafree" not in real["distill"]
    assert real == DistillStage().config(load_config(write_config()))
    synthetic = DistillStage().config(load_config(write_config({"distill": {"data": "synthetic", "method": "kd"}})))
    assert synthetic["distill"]["data"] == "synthetic" and synthetic["distill"]["datafree"]["z_dim"] == 128


def test_features_stage_is_the_disabled_one_with_synthetic_data(write_config):
    on = {"features": {"enabled": True}}
    synthetic = load_config(write_config({**on, "distill": {"data": "synthetic", "method": "kd"}}))
    off = load_config(write_config())
    assert FeaturesStage().config(synthetic) == FeaturesStage().config(off) == {"features": {"enabled": False}}
    assert FeaturesStage().config(load_config(write_config(on)))["features"]["enabled"] is True


def test_data_free_checks_pass_for_a_teacher_method_and_refuse_no_validation_images(write_config):
    cfg = load_config(write_config({"distill": {"data": "synthetic", "method": "simkd", "compare": ["kd"]}}))
    DistillStage().check(cfg)
    datafree.check_export(cfg)
    datafree.require_validation(cfg, 1)
    with pytest.raises(ConfigError, match=r"data\.val_fraction.*needs labelled validation images"):
        datafree.require_validation(cfg, 0)
