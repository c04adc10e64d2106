"""Tests for kdpipe.exporters.variants on a small trained CNN shaped like a real student (conv-BN-ReLU, linear)."""

from __future__ import annotations

import contextlib
import io
import json
import typing
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from kdpipe.config import Variant
from kdpipe.exporters.variants import VARIANTS, compare, evaluate_onnx, make_variant

CLASSES = 4
SIZE = 12


def synthetic(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Four fixed random templates plus noise: separable enough that 30 SGD steps give meaningful logits."""
    templates = np.random.default_rng(1234).normal(size=(CLASSES, 1, SIZE, SIZE)).astype(np.float32)
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, size=n)
    images = templates[labels] + 0.8 * rng.normal(size=(n, 1, SIZE, SIZE)).astype(np.float32)
    return images.astype(np.float32), labels


def student() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, CLASSES),
    )


@pytest.fixture(scope="module")
def fp32(tmp_path_factory: pytest.TempPathFactory) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = student()
    images, labels = synthetic(256, seed=1)
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    for step in range(30):
        idx = torch.arange(step * 32, step * 32 + 32) % len(x)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    model.eval()

    path = tmp_path_factory.mktemp("variants") / "fp32.onnx"
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (x[:2],),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    test_images, test_labels = synthetic(64, seed=2)
    reference = evaluate_onnx(path, test_images)
    return {
        "path": path,
        "calibration": images[:96],
        "images": test_images,
        "labels": test_labels,
        "reference": reference,
        "metrics": compare(reference, reference, test_labels),
    }


@pytest.fixture(scope="module")
def variants(fp32: dict) -> dict:
    out = {}
    for name in VARIANTS.names():
        dst = fp32["path"].parent / name / f"{name}.onnx"
        ranges = dst.with_suffix(".ranges.json") if name == "int8_static" else None
        info = make_variant(
            name, fp32["path"], dst, calibration=fp32["calibration"], ranges_path=ranges,
            validation=(fp32["images"], fp32["labels"]),  # int8_fallback's stopping rule (the stage passes val)
        )  # fmt: skip
        out[name] = {"path": dst, "info": info, "ranges": ranges}
    return out


def test_reference_is_meaningful(fp32: dict) -> None:
    assert fp32["metrics"]["top1"] >= 0.7  # the trained net has learnt the templates
    assert fp32["metrics"]["top5"] == 1.0  # 4 classes: k = 4


@pytest.mark.parametrize("name", VARIANTS.names())
def test_variant_is_single_runnable_file(name: str, variants: dict) -> None:
    path = variants[name]["path"]
    assert path.is_file()
    ranges = variants[name]["ranges"]
    expected = {path.name} | ({ranges.name} if ranges else set())
    assert {p.name for p in path.parent.iterdir()} == expected  # no external-data sidecar, no leftover temp files
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        (logits,) = session.run(None, {"input": np.zeros((batch, 1, SIZE, SIZE), np.float32)})
        assert logits.shape == (batch, CLASSES)
        assert logits.dtype == np.float32
    assert variants[name]["info"]["variant"] == name
    # the class's declared storage type (report.json's quantization.dtype) is what the file holds
    types = {init.data_type for init in onnx.load(str(path)).graph.initializer}
    assert (onnx.TensorProto.INT8 in types) == (VARIANTS.get(name).quantized == "int8")


def test_accuracy_against_fp32(fp32: dict, variants: dict) -> None:
    got = {
        name: compare(evaluate_onnx(v["path"], fp32["images"], batch_size=16), fp32["reference"], fp32["labels"])
        for name, v in variants.items()
    }
    assert got["optimized"]["max_abs_diff"] < 1e-4
    assert got["fp16"]["max_abs_diff"] < 1e-2
    assert got["fp16"]["top1_agreement"] >= 0.95
    for name in ("int8_dynamic", "int8_static"):
        assert got[name]["top1_agreement"] >= 0.9, (name, got[name])
        assert abs(got[name]["top1"] - fp32["metrics"]["top1"]) <= 0.1, (name, got[name])


def test_static_writes_ranges_and_qdq(fp32: dict, variants: dict) -> None:
    static = variants["int8_static"]
    ranges = json.loads(static["ranges"].read_text())
    assert ranges
    for name, pair in ranges.items():
        assert isinstance(pair, list) and len(pair) == 2 and pair[0] <= pair[1], (name, pair)
    assert "input" in ranges
    info = static["info"]
    assert info["calibration_samples"] == len(fp32["calibration"])
    assert info["method"] == "minmax" and info["per_channel"] is True
    assert info["tensors"] == len(ranges)
    ops = {node.op_type for node in onnx.load(str(static["path"])).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops


def test_static_other_methods(fp32: dict, tmp_path: Path) -> None:
    info = make_variant(
        "int8_static",
        fp32["path"],
        tmp_path / "p.onnx",
        calibration=fp32["calibration"][:40],
        method="percentile",
        per_channel=False,
    )
    assert info["method"] == "percentile" and info["calibration_samples"] == 40 and info["tensors"] > 0
    agreement = compare(evaluate_onnx(tmp_path / "p.onnx", fp32["images"]), fp32["reference"])["top1_agreement"]
    assert agreement >= 0.8


def test_config_names_every_registered_variant() -> None:
    assert sorted(typing.get_args(Variant)) == VARIANTS.names()


def test_errors(fp32: dict, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="int8_dynamic"):
        make_variant("int4", fp32["path"], tmp_path / "x.onnx")
    with pytest.raises(ValueError, match="calibration"):
        make_variant("int8_static", fp32["path"], tmp_path / "x.onnx")
    with pytest.raises(ValueError, match="method"):
        make_variant("int8_static", fp32["path"], tmp_path / "x.onnx", calibration=fp32["calibration"], method="mse")
    assert not (tmp_path / "x.onnx").exists()


def test_compare_without_labels_and_topk() -> None:
    ref = np.array([[3.0, 2.0, 1.0, 0.0, -1.0, -2.0], [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]], np.float32)
    out = compare(ref + 0.5, ref)
    assert set(out) == {"max_abs_diff", "mean_abs_diff", "top1_agreement"}
    assert out["max_abs_diff"] == pytest.approx(0.5) and out["top1_agreement"] == 1.0
    labels = np.array([4, 0])  # row 0: label ranks 5th (in top-5); row 1: label ranks 6th (not)
    out = compare(ref, ref, labels)
    assert out["top1"] == 0.0 and out["top5"] == 0.5
    with pytest.raises(ValueError):
        compare(ref[:1], ref)
