"""Zipf's label smoothing: ranks with ties, the Zipf targets, the KL term by hand, dense votes, and that no teacher
ever runs for it."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdpipe.config import DistillConfig, load_config
from kdpipe.errors import ConfigError
from kdpipe.ml.data.memory import Batch
from kdpipe.ml.models.zoo import create_model
from kdpipe.runner import run_pipeline
from kdpipe.stages.distillers import DISTILLERS, DataInfo, OnlineTeacher, TeacherParts, load_student
from kdpipe.stages.distillers.zipf import dense_votes, min_ranks, zipf_targets, zipf_term

INFO = DataInfo(4, (1, 12, 12), ["a", "b", "c", "d"])


def test_ranks_put_the_highest_first_and_ties_share_the_best_rank():
    scores = torch.tensor([[3.0, 1.0, 3.0, 2.0], [0.0, 0.0, 0.0, 5.0]])
    assert min_ranks(scores).tolist() == [[1, 4, 1, 3], [2, 2, 2, 1]]


@pytest.mark.parametrize("power", [1.0, 2.0])
def test_targets_follow_zipf_by_rank_over_the_non_target_classes(power):
    scores = torch.tensor([[0.1, 5.0, 3.0, 1.0]])  # ranks 4, 1, 2, 3; label 0 (ranked last, but has no target)
    q = zipf_targets(scores, torch.tensor([0]), power)
    w = [1.0, 2.0**-power, 3.0**-power]
    torch.testing.assert_close(q, torch.tensor([[v / sum(w) for v in w]]))
    g = torch.Generator().manual_seed(0)
    scores, labels = torch.randn(32, 10, generator=g), torch.randint(0, 10, (32,), generator=g)
    q = zipf_targets(scores, labels, power)
    torch.testing.assert_close(q.sum(1), torch.ones(32))
    keep = torch.ones(32, 10, dtype=torch.bool).scatter_(1, labels[:, None], False)
    rest = scores[keep].view(32, 9)
    by_rank = q.gather(1, rest.argsort(1, descending=True))
    assert torch.all(by_rank[:, :-1] > by_rank[:, 1:])  # strictly decreasing with the rank


def test_the_zipf_term_by_hand_and_only_on_correct_images():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0], [0.0, 3.0, 1.0, 2.0]])
    labels = torch.tensor([0, 0])  # the first image is right, the second wrong
    kls = []
    for row in range(2):
        z = logits[row].tolist()
        ranks = [1 + sum(o > v for o in z) for v in z]
        w = [1 / r for k, r in enumerate(ranks) if k != 0]
        q = [v / sum(w) for v in w]
        e = [math.exp(v) for v in z[1:]]
        p = [v / sum(e) for v in e]
        kls.append(sum(a * math.log(a / b) for a, b in zip(q, p, strict=True)))
    assert math.isclose(zipf_term(logits, logits, labels, 1.0).item(), sum(kls) / 2, rel_tol=1e-5)
    assert math.isclose(zipf_term(logits, logits, labels, 1.0, only_correct=True).item(), kls[0], rel_tol=1e-5)
    wrong = torch.tensor([1, 1, 1])
    assert zipf_term(torch.eye(3) * 5, torch.eye(3), wrong, 1.0, only_correct=True).item() == 0.0


def test_dense_votes_count_the_classifier_picks_position_by_position():
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 3, bias=False))
    nn.init.eye_(head[2].weight)
    features = torch.zeros(1, 3, 2, 2)
    features[0, 2, 0, 0] = features[0, 2, 0, 1] = features[0, 0, 1, 0] = 1.0  # positions pick 2, 2, 0 and 0
    features[0, 0, 1, 1] = 0.5
    head.train()
    assert dense_votes(features, head, 3).tolist() == [[2.0, 0.0, 2.0]]
    assert head.training  # the mode the training loop set is given back


def _zipf(rank: str):
    distiller = DISTILLERS.get("zipf_ls")()
    torch.manual_seed(0)
    conf = DistillConfig(student="tiny_cnn", method="zipf_ls", zipf={"rank": rank, "weight": 0.3})
    return distiller, distiller.build(TeacherParts(None, None), "tiny_cnn", INFO, conf)


@pytest.mark.parametrize("rank", ["dense", "logits"])
def test_the_loss_is_ce_plus_the_weighted_zipf_term_and_the_teacher_never_runs(rank):
    class Exploding(nn.Module):
        def forward(self, x):
            raise AssertionError("the teacher must not run")

    distiller, built = _zipf(rank)
    assert distiller.signals == frozenset()
    g = torch.Generator().manual_seed(2)
    batch = Batch(torch.randn(6, 1, 12, 12, generator=g), torch.randint(0, 4, (6,), generator=g), torch.arange(6))
    signals = OnlineTeacher(Exploding(), None, distiller.signals, torch.device("cpu"))(batch)
    assert signals == {}
    built.trainable.train()
    loss = distiller.loss(built, batch, signals)
    loss.backward()
    assert all(p.grad is not None for p in built.model.parameters())  # the deployable student is what trains
    built.trainable.eval()
    with torch.no_grad():
        logits = built.model(batch.x)
        if rank == "dense":
            net = built.trainable
            scores = dense_votes(net.body(batch.x), net.head, 4)
        else:
            scores = logits
        expected = F.cross_entropy(logits, batch.y) + 0.3 * zipf_term(logits, scores, batch.y, 1.0)
        torch.testing.assert_close(distiller.loss(built, batch, {}), expected)
    plain = create_model("tiny_cnn", num_classes=4, in_channels=1)
    plain.load_state_dict(built.model.state_dict())  # the deployable is the plain student


def test_a_run_with_only_teacher_free_methods_never_asks_the_teacher(write_config, monkeypatch):
    def online(self, batch):
        assert not self.signals, "a teacher-free method asked the teacher"
        return {}

    monkeypatch.setattr(OnlineTeacher, "__call__", online)
    path = write_config({"distill": {"method": "zipf_ls", "compare": ["scratch"], "train": {"epochs": 1}}})
    report = run_pipeline(path, until="distill", echo=lambda s: None)
    rows = {r["method"]: r for r in report["comparison"]}
    assert set(rows) == {"zipf_ls", "scratch"} and not any(r["uses_teacher"] for r in rows.values())
    assert rows["scratch"]["delta_vs_scratch"] == 0 and rows["zipf_ls"]["delta_vs_scratch"] is not None
    model, spec = load_student(load_config(path).output_dir)  # rebuilt from its spec: the plain student
    assert spec["method"] == "zipf_ls" and spec["rank"] == "dense" and not spec["only_correct"]
    assert type(model) is type(create_model("tiny_cnn", num_classes=4, in_channels=1))


@pytest.mark.parametrize(
    ("zipf", "message"),
    [
        ({"weight": -0.1}, r"distill.zipf.weight: must be >= 0"),
        ({"power": 0}, r"distill.zipf.power: must be > 0"),
        ({"rank": "soft"}, r"distill.zipf.rank: must be one of"),
    ],
)
def test_bad_zipf_settings_are_one_line_errors(write_config, zipf, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write_config({"distill": {"method": "zipf_ls", "zipf": zipf}}))


def test_the_verdict_names_the_best_teacher_free_baseline():
    from kdpipe.reporting.summary import distillation_verdict

    rows = [
        {"method": "crd", "deployed": True, "uses_teacher": True, "test_top1": 0.85},
        {"method": "zipf_ls", "deployed": False, "uses_teacher": False, "test_top1": 0.86},
        {"method": "scratch", "deployed": False, "uses_teacher": False, "test_top1": 0.84},
    ]
    text = distillation_verdict({"comparison": rows})
    assert text.startswith("Distillation pays off here: crd 85.00% vs scratch 84.00%")
    assert text.endswith("Against the best teacher-free baseline, zipf_ls 86.00%: -1.00 pp.")
    older = [{k: v for k, v in r.items() if k != "uses_teacher"} for r in rows]  # reports from before the key
    assert "teacher-free" not in distillation_verdict({"comparison": older})
