"""What the reports say about a data-free student (report.json ``training_data``): the statement that it never saw a
training image, the generator's terms, int8 calibration, the collapse warning, and the grid of generated images."""

from __future__ import annotations

import base64
import zlib

import numpy as np

from kdpipe.reporting import datafree, summary
from kdpipe.reporting.html import render_html
from kdpipe.reporting.markdown import render_markdown
from kdpipe.reporting.model_card import render_model_card

INT8 = {"dtype": "int8", "calibration_samples": 24}


def _grid(counts: list[int], shape=(1, 6, 6)) -> dict:
    images = np.arange(sum(counts) * int(np.prod(shape)), dtype=np.uint8).reshape(sum(counts), *shape)
    return {
        "classes": [f"c{i}" for i in range(len(counts))],
        "total_classes": len(counts),
        "counts": counts,
        "shape": list(shape),
        "data": base64.b64encode(zlib.compress(images.tobytes())).decode(),
    }


def _report(collapse: bool = False) -> dict:
    epochs = [{"epoch": 2, "reason": "class 'c0' is 80% of the generated images (limit 50%)"}] if collapse else []
    return {
        "dataset": {"name": "synthetic", "classes": ["c0", "c1", "c2"], "input_shape": [1, 6, 6]},
        "models": {
            "student": {"arch": "tiny_cnn", "method": "kd", "accuracy": {"top1": 0.5}},
            "student-int8_static": {
                "arch": "tiny_cnn",
                "variant": "int8_static",
                "accuracy": {"top1": 0.5},
                "quantization": INT8,
            },
        },
        "training_data": {
            "source": "synthetic",
            "real_training_images": 0,
            "generator": {
                "terms": ["ce", "entropy", "adversarial"],
                "weights": {"ce": 1.0, "entropy": 5.0, "adversarial": 1.0},
                "left_out": {"bn": "the teacher has no BatchNorm layers"},
                "conditional": True,
                "parameters": 1000,
                "steps": 10,
                "images": 160,
            },
            "collapse": {"detected": collapse, "epochs": epochs},
            "samples": {"count": 5, "grid": _grid([3, 2, 0])},
        },
    }


def test_lines_say_zero_real_images_terms_left_out_and_calibration():
    text = " ".join(datafree.lines(_report()))
    assert "trained without the original data: 0 real training images" in text
    assert "ce (one-hot cross-entropy (DAFL), weight 1.0)" in text
    assert "bn (the teacher has no BatchNorm layers)" in text
    assert "Int8 calibration (student-int8_static) used 24 generated images" in text
    assert datafree.flag(_report()) is None


def test_a_real_data_report_says_nothing_about_training_data():
    report = _report()
    report["training_data"] = {"source": "real", "real_training_images": 54000}
    assert datafree.lines(report) == [] and datafree.statement(report) is None
    assert "Training data" not in render_markdown(report)
    assert "Training data" not in render_html(report)


def test_collapse_is_a_flag_in_every_report():
    report = _report(collapse=True)
    warning = datafree.flag(report)
    assert warning and "epoch 2" in warning and "'c0' is 80%" in warning
    assert warning in summary.flags(report)
    assert warning in render_markdown(report)
    assert warning in render_model_card(report)


def test_grid_decodes_per_class_and_is_drawn_in_the_html_report():
    classes, per_class = datafree.decode_grid(_report()["training_data"]["samples"]["grid"])
    assert classes == ["c0", "c1", "c2"] and [len(p) for p in per_class] == [3, 2, 0]
    assert per_class[1].shape == (2, 1, 6, 6) and per_class[1][0, 0, 0, 0] == 3 * 36 % 256
    page = render_html(_report())
    assert "<h2>Training data: synthetic</h2>" in page and 'alt="Generated images per class"' in page
    assert datafree.decode_grid({"counts": [2], "shape": [1, 2, 2], "data": "not base64!"}) is None


def test_model_card_and_markdown_say_the_student_never_saw_the_original_data():
    card = render_model_card(_report())
    assert "- **Training data**: The student was trained without the original data: 0 real training images" in card
    assert "**Training data**: The student was trained without the original data" in render_markdown(_report())
