"""Teachers shipped with kdpipe: the files are the manifest's, their recipes still load, `shipped:NAME` uses them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

import kdpipe.teachers as shipped
from kdpipe.cli import main
from kdpipe.config import load_config
from kdpipe.errors import ConfigError
from kdpipe.fileio import sha256_file
from kdpipe.ml.models.zoo import create_model, model_names
from tests.conftest import TINY, deep_merge

ROOT = Path(__file__).resolve().parents[2]


def test_every_shipped_file_matches_its_manifest():
    teachers = shipped.manifest()
    if not teachers:
        pytest.skip("no teacher shipped in this checkout yet (tools/ship_teacher.py adds one)")
    for name, entry in teachers.items():
        path = shipped.shipped_path(name)
        assert path.stat().st_size == entry["bytes"]
        assert sha256_file(path) == entry["sha256"], f"{path} differs from teachers.json"
        assert shipped.verify(name)
        assert entry["arch"] in model_names() and 0.5 < entry["test_top1"] <= 1 and 0.5 < entry["val_top1"] <= 1


def test_every_shipped_recipe_is_still_a_valid_config():
    if not shipped.manifest():
        pytest.skip("no teacher shipped in this checkout yet (tools/ship_teacher.py adds one)")
    for name, entry in shipped.manifest().items():
        recipe = entry["recipe"]
        cfg = load_config(ROOT / recipe["config"])  # the recipe that made it: still runnable as it is
        assert cfg.config.teacher.source == "train" and cfg.config.teacher.arch == entry["arch"], name
        assert cfg.config.data.dataset == entry["dataset"]
        assert cfg.config.teacher.train.epochs == recipe["train"]["epochs"]
        assert recipe["command"] == f"kdpipe run -c {recipe['config']} --until teacher"
        assert len(recipe["cache_key"]) == 64


@pytest.fixture
def tiny_shipped(tmp_path: Path, monkeypatch):
    """A private shipped-teacher folder holding a tiny_cnn_wide for the synthetic data of TINY."""
    torch.manual_seed(0)
    model = create_model("tiny_cnn_wide", num_classes=4, in_channels=1)
    file = tmp_path / "teachers" / "tiny.safetensors"
    file.parent.mkdir()
    save_file(model.state_dict(), str(file))
    entry = {"file": file.name, "sha256": sha256_file(file), "bytes": file.stat().st_size, "arch": "tiny_cnn_wide",
             "dataset": "synthetic", "parameters": 1, "val_top1": 0.9, "test_top1": 0.9,
             "recipe": {"config": "x.yaml", "command": "kdpipe run", "cache_key": "0" * 64}}  # fmt: skip
    (file.parent / "teachers.json").write_text(json.dumps({"schema": shipped.SCHEMA, "teachers": {"tiny": entry}}))
    monkeypatch.setattr(shipped, "FOLDER", file.parent)
    monkeypatch.setattr(shipped, "MANIFEST", file.parent / "teachers.json")
    shipped.manifest.cache_clear()
    yield model
    shipped.manifest.cache_clear()


def test_shipped_name_sets_source_and_arch(tiny_shipped, write_config):
    cfg = load_config(write_config({"teacher": {"path": "shipped:tiny", "train": {}}}))
    assert (cfg.config.teacher.source, cfg.config.teacher.arch) == ("checkpoint", "tiny_cnn_wide")
    assert cfg.resolve(cfg.config.teacher.path) == shipped.FOLDER / "tiny.safetensors"


@pytest.mark.parametrize(
    ("teacher", "data", "message"),
    [
        ({"path": "shipped:nope"}, {}, "no shipped teacher 'nope' (`kdpipe teachers` lists them: tiny)"),
        ({"path": "shipped:tiny", "arch": "resnet8"}, {}, "is a tiny_cnn_wide, not resnet8"),
        ({"path": "shipped:tiny", "source": "torchscript"}, {}, "a shipped teacher is a checkpoint"),
        ({"path": "shipped:tiny"}, {"dataset": "fashion_mnist"}, "was trained on synthetic"),
    ],
)
def test_shipped_misuse_is_one_line_naming_the_key(tiny_shipped, write_config, teacher, data, message):
    config = write_config({"teacher": teacher, "data": data})
    with pytest.raises(ConfigError) as err:
        load_config(config)
    assert message in str(err.value) and "teacher" in str(err.value) and config.name in str(err.value)


def test_run_uses_the_shipped_weights(tiny_shipped, tmp_path: Path, capsys):
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump(deep_merge(TINY, {"teacher": {"path": "shipped:tiny"}})))
    assert main(["run", "-c", str(config), "--until", "teacher"]) == 0
    report = json.loads((tmp_path / "kdpipe-out" / "report.json").read_text())
    key = report["stages"]["teacher"]["key"]
    folder = tmp_path / ".kdpipe" / "teacher" / key
    loaded = create_model("tiny_cnn_wide", num_classes=4, in_channels=1)
    weights = folder / "teacher.safetensors"
    from kdpipe.ml.models.loading import load_state_dict_file

    state = load_state_dict_file(weights if weights.is_file() else folder / "teacher.pt", "x", False, "x")
    loaded.load_state_dict(state)
    for a, b in zip(loaded.state_dict().values(), tiny_shipped.state_dict().values(), strict=True):
        assert torch.equal(a, b)  # the teacher stage holds exactly the shipped weights, untrained
    assert main(["teachers", "--verify"]) == 0
    out = capsys.readouterr().out
    assert "shipped:tiny" in out and "sha256 verified: 1 file(s)" in out
