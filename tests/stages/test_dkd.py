"""DKD: the TCKD/NCKD decomposition of KD, the loss on hand-computed logits, the warm-up by epoch, bad settings."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdpipe.config import DistillConfig, load_config
from kdpipe.errors import ConfigError
from kdpipe.ml.data.memory import Batch
from kdpipe.runner import run_pipeline
from kdpipe.stages.distillers import DISTILLERS, DataInfo, TeacherParts
from kdpipe.stages.distillers.dkd import dkd_loss, dkd_terms, warmup_weight
from kdpipe.stages.distillers.kd import kd_loss


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))


def _softmax(z: list[float]) -> list[float]:
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


def test_tckd_and_nckd_by_hand():
    s, t, temp = [2.0, 0.0, -1.0], [1.0, 2.0, 0.0], 2.0  # label 0
    ps, pt = _softmax([v / temp for v in s]), _softmax([v / temp for v in t])
    tckd = _kl([pt[0], 1 - pt[0]], [ps[0], 1 - ps[0]])
    nckd = _kl(_softmax([t[1] / temp, t[2] / temp]), _softmax([s[1] / temp, s[2] / temp]))
    got_t, got_n = dkd_terms(torch.tensor([s]), torch.tensor([t]), torch.tensor([0]), temp)
    assert math.isclose(got_t.item(), tckd, rel_tol=1e-5) and math.isclose(got_n.item(), nckd, rel_tol=1e-5)
    ce = -math.log(_softmax(s)[0])
    loss = dkd_loss(torch.tensor([s]), torch.tensor([t]), torch.tensor([0]), temp, alpha=1.0, beta=8.0)
    assert math.isclose(loss.item(), ce + temp**2 * (tckd + 8 * nckd), rel_tol=1e-5)


def test_kd_is_tckd_plus_one_minus_teacher_target_prob_times_nckd():
    g = torch.Generator().manual_seed(0)
    s, t, y = torch.randn(16, 7, generator=g) * 3, torch.randn(16, 7, generator=g) * 3, torch.randint(0, 7, (16,))
    temp = 4.0
    tckd, nckd = dkd_terms(s, t, y, temp)
    p_t = torch.softmax(t / temp, 1)[torch.arange(16), y]
    kl = F.kl_div(F.log_softmax(s / temp, 1), F.softmax(t / temp, 1), reduction="none").sum(1)
    torch.testing.assert_close(tckd + (1 - p_t) * nckd, kl, atol=1e-5, rtol=1e-5)  # per image, the paper's eq. 1
    # alpha = beta = 1 is KD plus T²·p_t·NCKD: DKD equals KD only where the teacher gives the target nothing
    ce = F.cross_entropy(s, y)
    kd = kd_loss(s, t, y, temp, alpha=1.0)
    torch.testing.assert_close(
        dkd_loss(s, t, y, temp, 1.0, 1.0) - ce, kd + temp**2 * (p_t * nckd).mean(), atol=1e-5, rtol=1e-5
    )
    same = dkd_terms(s, s, y, temp)
    assert torch.all(same[0].abs() < 1e-6) and torch.all(same[1].abs() < 1e-6)


def test_confident_logits_stay_finite():
    s = torch.tensor([[300.0, -300.0, 0.0]])
    t = torch.tensor([[-300.0, 300.0, 0.0]])
    tckd, nckd = dkd_terms(s, t, torch.tensor([0]), 1.0)
    assert torch.isfinite(tckd).all() and torch.isfinite(nckd).all() and tckd.item() > 100


def test_the_warm_up_ramps_the_distillation_terms_by_epoch():
    assert [warmup_weight(e, 4) for e in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_weight(0, 0) == 1.0
    distiller = DISTILLERS.get("dkd")()
    info = DataInfo(4, (1, 12, 12), ["a", "b", "c", "d"])
    torch.manual_seed(0)
    built = distiller.build(TeacherParts(None, None), "tiny_cnn", info, DistillConfig(student="tiny_cnn",
                                                                                        dkd={"warmup": 4}))  # fmt: skip
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 1, 12, 12, generator=g), torch.randint(0, 4, (6,), generator=g)
    teacher = {"logits": torch.randn(6, 4, generator=g)}
    built.model.eval()
    logits = built.model(x)
    ce = F.cross_entropy(logits, y)
    full = dkd_loss(logits, teacher["logits"], y, 4.0, 1.0, 8.0) - ce
    for epoch, weight in ((0, 0.25), (2, 0.75), (7, 1.0)):
        got = distiller.loss(built, Batch(x, y, torch.arange(6), epoch=epoch), teacher)
        torch.testing.assert_close(got, ce + weight * full)


@pytest.mark.parametrize(
    ("dkd", "message"),
    [
        ({"alpha": -1}, r"distill.dkd.alpha: must be >= 0"),
        ({"beta": -0.5}, r"distill.dkd.beta: must be >= 0"),
        ({"temperature": 0}, r"distill.dkd.temperature: must be > 0"),
        ({"warmup": -1}, r"distill.dkd.warmup: must be >= 0"),
    ],
)
def test_bad_dkd_settings_are_one_line_errors(write_config, dkd, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write_config({"distill": {"method": "dkd", "dkd": dkd}}))


def test_a_warm_up_longer_than_the_run_is_refused_before_any_stage(write_config, monkeypatch):
    from kdpipe.stages import STAGES

    ran = []
    for name in STAGES:
        monkeypatch.setattr(STAGES.get(name), "run", lambda self, ctx, _n=name: ran.append(_n))
    path = write_config({"distill": {"compare": ["dkd"], "dkd": {"warmup": 20}}})  # 2 epochs
    with pytest.raises(ConfigError, match=r"distill.dkd.warmup: 20 warm-up epochs, but distill.train.epochs is 2"):
        run_pipeline(path, echo=lambda s: None)
    assert ran == []


def test_default_warmup_is_the_papers_share_of_the_schedule():
    """The paper warms up over 20 of 240 epochs; unset, the warm-up keeps that share of any schedule."""
    from kdpipe.config import DKDConfig

    assert DKDConfig().warmup_epochs(240) == 20
    assert DKDConfig().warmup_epochs(4) == 0  # a short schedule starts at full weight: never refused
    assert DKDConfig(warmup=3).warmup_epochs(4) == 3
