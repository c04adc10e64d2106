"""Weights files: safetensors and state_dict files load; a pickle with code is refused before it runs."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from torch import nn

from kdpipe.errors import ConfigError, UsageError
from kdpipe.ml.models.weights import is_safetensors, load_weights, read_metadata, save_weights


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(3)).eval()


def _model() -> nn.Module:
    m = tiny()
    m(torch.zeros(1, 1, 6, 6))  # materialise the lazy layer
    return m


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_safetensors_round_trip_with_metadata(tmp_path):
    model = _model()
    path = save_weights(model, tmp_path / "w.safetensors", metadata={"arch": "tiny", "mean": [0.5]})
    assert is_safetensors(path) and not list(tmp_path.glob(".*.tmp"))
    _same(load_weights(path), model.state_dict())
    assert read_metadata(path) == {"arch": "tiny", "mean": "[0.5]"}


def test_safetensors_is_recognised_by_its_header_whatever_the_suffix(tmp_path):
    model = _model()
    save_weights(model, tmp_path / "w.bin")
    assert is_safetensors(tmp_path / "w.bin")
    _same(load_weights(tmp_path / "w.bin"), model.state_dict())


def test_tied_weights_save(tmp_path):
    a = nn.Linear(3, 3)
    b = nn.Linear(3, 3)
    b.weight = a.weight  # shared storage: safetensors' save_file refuses it unless copied
    model = nn.Sequential(a, b)
    _same(load_weights(save_weights(model, tmp_path / "tied.safetensors")), model.state_dict())


@pytest.mark.parametrize(
    "wrap",
    [
        lambda s: s,
        lambda s: {"state_dict": s, "epoch": 3},
        lambda s: {"model": {f"module.{k}": v for k, v in s.items()}},
    ],
    ids=["plain", "wrapped", "ddp"],
)
def test_state_dict_files_load_with_weights_only(tmp_path, wrap):
    model = _model()
    torch.save(wrap(model.state_dict()), tmp_path / "w.pt")
    _same(load_weights(tmp_path / "w.pt"), model.state_dict())


class MakesAFile:
    """A pickle payload whose unpickling creates a folder: proof of whether the loader ran it."""

    target = ""

    def __reduce__(self):
        return (os.mkdir, (self.target,))


def test_a_pickle_payload_is_refused_without_running(tmp_path):
    marker = tmp_path / "ran"
    MakesAFile.target = str(marker)
    torch.save({"weight": torch.ones(2), "payload": MakesAFile()}, tmp_path / "evil.pt")
    with pytest.raises(ConfigError) as info:
        load_weights(tmp_path / "evil.pt", key="teacher.path", source="p.yaml")
    assert not marker.exists(), "the refused pickle ran"
    msg = str(info.value)
    assert msg.startswith("teacher.path: evil.pt is not a plain state_dict") and "\n" not in msg
    assert "teacher.allow_pickle: true" in msg and msg.endswith("(p.yaml)") and info.value.exit_code == 2
    # opted in, the same file does run: the test above could have failed
    with pytest.raises(ConfigError, match="entry 'payload' is a NoneType, not a tensor"):
        load_weights(tmp_path / "evil.pt", allow_pickle=True)
    assert marker.exists()


def test_a_raw_pickle_is_refused_too(tmp_path):
    marker = tmp_path / "ran"
    MakesAFile.target = str(marker)
    (tmp_path / "raw.pkl").write_bytes(pickle.dumps({"w": MakesAFile()}))
    with pytest.raises(UsageError, match=r"raw\.pkl"):
        load_weights(tmp_path / "raw.pkl")
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["safetensors", "torch"])
def test_truncated_files_are_one_line_naming_the_file(tmp_path, kind):
    model = _model()
    path = tmp_path / ("w.safetensors" if kind == "safetensors" else "w.pt")
    if kind == "safetensors":
        save_weights(model, path)
    else:
        torch.save(model.state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError) as info:
        load_weights(path, key="teacher.path")
    msg = str(info.value)
    assert msg.startswith(f"teacher.path: {path.name} is not a readable") and "\n" not in msg
    assert "truncated or corrupt" in msg and info.value.exit_code == 2


def test_garbage_and_missing_files(tmp_path):
    (tmp_path / "g.pt").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ConfigError, match=r"g\.pt is not a readable PyTorch checkpoint"):
        load_weights(tmp_path / "g.pt")
    with pytest.raises(ConfigError, match="file not found"):
        load_weights(tmp_path / "nope.safetensors")
    torch.save([torch.ones(1)], tmp_path / "list.pt")
    with pytest.raises(ConfigError, match=r"list\.pt holds a list, not a state_dict"):
        load_weights(tmp_path / "list.pt")
