"""The teacher's preprocessing travels with it; near-chance teachers and too-big students are caught."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import yaml

from kdpipe.config import Normalize
from kdpipe.errors import ConfigError
from kdpipe.ml.models.preprocessing import adapter_spec, read_sidecar, teacher_normalization, with_adapter
from kdpipe.ml.models.split import split_model
from kdpipe.ml.models.teacher_checks import (
    chance_ceiling,
    check_teacher_accuracy,
    size_verdict,
    smallest_fitting_factor,
)
from kdpipe.ml.models.zoo import create_model


def test_the_adapter_turns_data_normalisation_into_the_teachers():
    pixels = torch.rand(2, 3, 4, 4)
    dm, ds, tm, ts = [0.2, 0.3, 0.4], [0.1, 0.2, 0.3], [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    spec = adapter_spec(dm, ds, tm, ts)
    seen = []
    model = with_adapter(torch.nn.Identity(), spec)
    model.model.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    model((pixels - torch.tensor(dm).view(1, 3, 1, 1)) / torch.tensor(ds).view(1, 3, 1, 1))
    expected = (pixels - torch.tensor(tm).view(1, 3, 1, 1)) / torch.tensor(ts).view(1, 3, 1, 1)
    torch.testing.assert_close(seen[0], expected)
    assert (
        adapter_spec(dm, ds, dm, ds) is None
        and with_adapter(torch.nn.Identity(), None).__class__.__name__ == "Identity"
    )


def test_the_adapter_starts_the_split_body():
    model = create_model("timm:test_convnext", num_classes=4, in_channels=1)
    wrapped = with_adapter(model, adapter_spec([0.0], [1.0], [0.5], [0.5])).eval()
    x = torch.randn(2, 1, 32, 32)
    s = split_model(wrapped, x)
    torch.testing.assert_close(s.head(s.body(x)), wrapped(x))
    assert s.mode == "map"


def test_where_the_normalisation_comes_from(tmp_path):
    model = create_model("timm:resnet10t", num_classes=4, in_channels=3)
    conf = SimpleNamespace(preprocessing=None)
    assert teacher_normalization(conf, model, False, 3, tmp_path.joinpath, None) is None  # trained here: the data's
    mean, _, origin = teacher_normalization(conf, model, True, 3, tmp_path.joinpath, None)
    assert mean == [0.485, 0.456, 0.406] and origin == "timm pretrained_cfg"
    mean, _, _ = teacher_normalization(conf, model, True, 1, tmp_path.joinpath, None)
    assert mean == pytest.approx([(0.485 + 0.456 + 0.406) / 3])  # gray images: one mean for the summed first conv
    inline = SimpleNamespace(preprocessing=Normalize(mean=[0.1], std=[0.2]))
    assert teacher_normalization(inline, model, True, 1, tmp_path.joinpath, None)[:2] == ([0.1], [0.2])
    (tmp_path / "config.json").write_text(json.dumps({"pretrained_cfg": {"mean": [0.5], "std": [0.25]}}))
    sidecar = SimpleNamespace(preprocessing="config.json")
    assert teacher_normalization(sidecar, model, True, 1, tmp_path.joinpath, None)[:2] == ([0.5], [0.25])
    with pytest.raises(ConfigError, match=r"teacher.preprocessing: 2 values for 3-channel images"):
        teacher_normalization(SimpleNamespace(preprocessing=Normalize(mean=[0, 0], std=[1, 1])), model, True, 3,
                              tmp_path.joinpath, None)  # fmt: skip


def test_a_sidecar_without_statistics_is_refused(tmp_path):
    (tmp_path / "s.yaml").write_text("input_size: [3, 224, 224]\n")
    with pytest.raises(ConfigError, match=r"s.yaml has no mean and std"):
        read_sidecar(tmp_path / "s.yaml", "teacher.preprocessing", None)


def test_near_chance_is_refused_with_the_likely_causes():
    assert 0.25 < chance_ceiling(4, 1000) < 0.31 and chance_ceiling(10, 100) == pytest.approx(0.19)
    check_teacher_accuracy(0.87, 10, 6000, "checkpoint resnet20", "the data's own mean/std", "p.yaml")
    with pytest.raises(ConfigError) as info:
        check_teacher_accuracy(0.099, 10, 6000, "checkpoint resnet20", "the data's own mean/std", "p.yaml")
    msg = str(info.value)
    assert msg.startswith("teacher: the loaded teacher (checkpoint resnet20) scores 9.9% val top-1") and "\n" not in msg
    for cause in ("normalisation", "channel order", "class order", "wrong checkpoint", "check_accuracy: false"):
        assert cause in msg
    assert info.value.exit_code == 2


def test_the_size_verdict_names_the_factor_that_fits():
    assert size_verdict({"student": 10, "total": 10}, 100, None, None) is None
    fit = smallest_fitting_factor(500, 1000, lambda f: 4000 // f, 64, 3)
    assert fit == 9  # 500 + 4000 // 9 = 944 < 1000, and f = 8 gives exactly 1000
    msg = size_verdict({"body": 500, "projector": 1333, "head": 0, "total": 1833}, 1000, fit, 2)
    assert "1,833 parameters (body 500 + projector 1,333 + head 0), not fewer than the teacher's 1,000" in msg
    assert "distill.factor: 9 (now 2)" in msg
    assert "no projector factor fits" in size_verdict({"projector": 1, "total": 2000}, 1000, None, 2)


def test_a_loaded_timm_teachers_input_size_and_crop_become_the_datas_defaults(tmp_path):
    from kdpipe.config import load_config
    from kdpipe.ml.models.teacher_build import with_teacher_data_defaults

    (tmp_path / "imgs").mkdir()
    (tmp_path / "w.safetensors").write_bytes(b"")

    def cfg(data, teacher=None):
        teacher = teacher or {"source": "checkpoint", "arch": "timm:resnet10t", "path": "w.safetensors"}
        (tmp_path / "p.yaml").write_text(yaml.safe_dump({"data": {"dataset": "imagefolder", "root": "imgs", **data},
                                                         "teacher": teacher}))  # fmt: skip
        return load_config(tmp_path / "p.yaml")

    got = with_teacher_data_defaults(cfg({"recipe": "imagenet"})).config.data
    assert got.image_size == 176 and got.imagenet.crop_fraction == 0.875  # resnet10t.c3_in1k: 176 px, crop 0.875
    assert with_teacher_data_defaults(cfg({"image_size": 64})).config.data.image_size == 64  # the config wins
    trained = cfg({}, {"source": "train", "arch": "timm:resnet10t"})
    assert with_teacher_data_defaults(trained) is trained  # trained here: at the data's own size
    vit_teacher = {"source": "checkpoint", "arch": "timm:vit_tiny_patch16_224", "path": "w.safetensors"}
    vit = with_teacher_data_defaults(cfg({"recipe": "imagenet"}, vit_teacher)).config.data
    assert vit.image_size == 224 and vit.imagenet.crop_fraction == 0.9
