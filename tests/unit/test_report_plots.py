"""The HTML report's figures say what they show: labels on their own points, tick labels apart, losses apart."""

from __future__ import annotations

import itertools

import matplotlib

matplotlib.use("Agg")

from matplotlib.text import Annotation, Text

from kdpipe.reporting import plots


def _lat(p50: float) -> dict:
    return {"p50_ms": p50, "p90_ms": p50 * 1.2, "round_p50_ms": [p50 * f for f in (0.97, 1.0, 1.04)]}


# Crowded on purpose: three variants within a few microseconds and a fraction of a point of each other.
MODELS = {
    "teacher": {"accuracy": {"top1": 0.95}, "latency": {"batch_1": _lat(0.50), "batch_64": _lat(30.0)}},
    "student": {"accuracy": {"top1": 0.93}, "latency": {"batch_1": _lat(0.171), "batch_64": _lat(10.3)}},
    "student-int8_static": {"accuracy": {"top1": 0.9295}, "latency": {"batch_1": _lat(0.114), "batch_64": _lat(5.9)}},
    "student-fp16": {"accuracy": {"top1": 0.9301}, "latency": {"batch_1": _lat(0.175), "batch_64": _lat(13.8)}},
    "student-int8_dynamic": {"accuracy": {"top1": 0.929}, "latency": {"batch_1": _lat(1.33), "batch_64": _lat(85.0)}},
}


def _draw(fig):
    fig.canvas.draw()
    return fig.canvas.get_renderer()


def test_pareto_labels_each_point_as_itself_without_overlap():
    fig = plots.pareto(MODELS, 1, "p90_ms", "student-int8_static")
    renderer = _draw(fig)
    ax = fig.axes[0]
    labels = [t for t in ax.texts if isinstance(t, Annotation)]
    assert sorted(t.get_text() for t in labels) == sorted(MODELS)
    for t in labels:  # anchored on its own model's point: p90 at batch 1 and test top-1
        m = MODELS[t.get_text()]
        assert t.xy == (m["latency"]["batch_1"]["p90_ms"], 100 * m["accuracy"]["top1"])
    boxes = [Text.get_window_extent(t, renderer) for t in labels]
    for a, b in itertools.combinations(boxes, 2):
        assert not a.overlaps(b)
    assert "p90" in ax.get_xlabel() and "batch 1" in ax.get_xlabel()
    assert "recommended" in [t.get_text() for t in ax.get_legend().get_texts()]


def test_latency_tick_labels_do_not_overlap():
    fig = plots.latency(MODELS, [1, 64])
    renderer = _draw(fig)
    for ax in fig.axes:
        for ticks in (ax.get_xticklabels(), ax.get_yticklabels()):
            boxes = [t.get_window_extent(renderer) for t in ticks if t.get_visible() and t.get_text()]
            assert len(boxes) >= 2
            for a, b in itertools.combinations(boxes, 2):
                assert not a.overlaps(b), [t.get_text() for t in ticks]
        assert [t.get_text() for t in ax.get_yticklabels()][::-1] == list(MODELS)  # first model on top


def test_log_ticks_are_round_and_apart():
    assert plots.log_ticks(0.1, 100, 1200) == [0.1, 0.2, 0.3, 0.5, 1, 2, 3, 5, 10, 20, 30, 50, 100]
    assert plots.log_ticks(0.1, 100, 400) == [0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100]  # less room: sparser
    assert plots.log_ticks(0.1, 100, 120) == [0.1, 1, 10, 100]


def test_each_models_loss_has_its_own_axis():
    hist = [{"epoch": e, "train_loss": 2.0 / e, "val_top1": 0.5 + e / 10} for e in (1, 2, 3)]
    small = [{"epoch": e, "train_loss": 0.02 / e, "val_top1": 0.4 + e / 10} for e in (1, 2, 3)]
    fig = plots.training({"teacher": {"history": hist}, "distill": {"history": small}}, {"distill": "simkd"})
    loss_t, loss_s, acc = fig.axes
    assert loss_t.get_ylabel() == "cross-entropy" and loss_s.get_ylabel() == "feature MSE"
    assert loss_t.get_ylim()[0] > 0.5 > loss_s.get_ylim()[1]  # each scaled to its own values
    assert len(acc.get_lines()) == 2
