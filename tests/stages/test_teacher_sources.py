"""The teacher stage loads checkpoints safely (weights_only), TorchScript, and torchvision architectures."""

import os

import pytest
import torch

from kdpipe.config import load_config
from kdpipe.errors import ConfigError
from kdpipe.ml.models.loading import load_teacher
from kdpipe.ml.models.zoo import create_model
from kdpipe.runner import run_pipeline


def run_teacher(write_config, teacher: dict, until="teacher"):
    cfg = load_config(write_config({"teacher": teacher}))
    run_pipeline(cfg, until=until, echo=lambda s: None)
    return cfg


def _entry(cfg, stage="teacher"):
    return next(p for p in (cfg.cache_dir / stage).iterdir() if not p.name.startswith("."))


def test_checkpoint_source_loads_a_state_dict(write_config, tmp_path):
    torch.manual_seed(1)
    model = create_model("tiny_cnn_wide", num_classes=4, in_channels=1)
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "t.pt")
    cfg = run_teacher(write_config, {"source": "checkpoint", "path": "t.pt"})
    loaded, spec = load_teacher(_entry(cfg))
    assert spec["source"] == "checkpoint"
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_a_pickle_with_code_is_refused_unless_opted_in(write_config, tmp_path):
    torch.save({"state_dict": {}, "payload": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ConfigError) as info:
        run_teacher(write_config, {"source": "checkpoint", "path": "evil.pt"})
    msg = str(info.value)
    assert msg.startswith("teacher.path: evil.pt is not a plain state_dict")
    assert "teacher.allow_pickle: true" in msg and msg.endswith("(pipeline.yaml)") and info.value.exit_code == 2


def test_wrong_architecture_and_missing_file(write_config, tmp_path):
    torch.save(create_model("tiny_cnn", num_classes=4, in_channels=1).state_dict(), tmp_path / "small.pt")
    with pytest.raises(ConfigError, match=r"teacher.path: the checkpoint does not fit 'tiny_cnn_wide'"):
        run_teacher(write_config, {"source": "checkpoint", "path": "small.pt"})
    with pytest.raises(ConfigError, match=r"teacher.path: file not found"):
        run_teacher(write_config, {"source": "checkpoint", "path": "nope.pt"})


def test_unknown_architecture_lists_names(write_config):
    with pytest.raises(Exception, match=r"unknown model 'resnet2'; did you mean"):
        run_teacher(write_config, {"arch": "resnet2"})


def test_torchscript_teacher_loads_but_simkd_needs_a_splittable_one(write_config, tmp_path):
    model = create_model("tiny_cnn_wide", num_classes=4, in_channels=1).eval()
    torch.jit.save(torch.jit.trace(model, torch.zeros(1, 1, 12, 12)), tmp_path / "t.ts")
    cfg = run_teacher(write_config, {"source": "torchscript", "path": "t.ts"})
    loaded, _ = load_teacher(_entry(cfg))
    x = torch.randn(2, 1, 12, 12)
    torch.testing.assert_close(loaded(x), model(x))
    with pytest.raises(ConfigError, match=r"teacher.source: SimKD reuses the teacher's classifier"):
        run_teacher(write_config, {"source": "torchscript", "path": "t.ts"}, until="distill")


def test_torchvision_source_with_local_weights(write_config, tmp_path):
    model = create_model("torchvision:resnet18", num_classes=4, in_channels=1)
    torch.save(model.state_dict(), tmp_path / "r18.pt")
    cfg = run_teacher(write_config, {"source": "torchvision", "arch": "torchvision:resnet18", "path": "r18.pt"})
    loaded, _ = load_teacher(_entry(cfg))
    assert torch.equal(loaded.state_dict()["model.fc.weight"], model.state_dict()["model.fc.weight"])
