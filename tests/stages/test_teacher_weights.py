"""The teacher stage takes safetensors checkpoints as well as state_dict files."""

import torch

from kdpipe.config import load_config
from kdpipe.ml.models.loading import load_teacher
from kdpipe.ml.models.weights import save_weights
from kdpipe.ml.models.zoo import create_model
from kdpipe.runner import run_pipeline


def test_checkpoint_source_loads_safetensors(write_config, tmp_path):
    torch.manual_seed(3)
    model = create_model("tiny_cnn_wide", num_classes=4, in_channels=1)
    save_weights(model, tmp_path / "t.safetensors")
    cfg = load_config(write_config({"teacher": {"source": "checkpoint", "path": "t.safetensors"}}))
    run_pipeline(cfg, until="teacher", echo=lambda s: None)
    folder = next(p for p in (cfg.cache_dir / "teacher").iterdir() if not p.name.startswith("."))
    loaded, spec = load_teacher(folder)
    assert spec["source"] == "checkpoint"
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
