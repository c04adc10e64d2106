"""Several teachers, one student: SimKD's student is one module averaging every teacher's head (and one ONNX
graph), KD's target is the mean of the teachers' probabilities, FitNet sums a hint per teacher, logits-only methods
get the mean logits, and methods that pair the student with one teacher's features are refused."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdpipe.config import DistillConfig
from kdpipe.exporters.onnx_export import export_onnx
from kdpipe.exporters.parity import check_parity
from kdpipe.ml.data.memory import Batch
from kdpipe.ml.models.loading import Ensemble
from kdpipe.ml.models.split import split_model
from kdpipe.ml.models.zoo import count_parameters, create_model
from kdpipe.stages.distillers import DISTILLERS, DataInfo, OnlineTeacher, TeacherParts
from kdpipe.stages.distillers.base import EnsembleSignals, pool
from kdpipe.stages.distillers.kd import kd_loss
from kdpipe.stages.distillers.simkd import EnsembleSimKDStudent, projector_size

INFO = DataInfo(num_classes=4, input_shape=(1, 12, 12), classes=["a", "b", "c", "d"])
WEIGHTS = [0.25, 0.75]


def _teachers() -> tuple[list[nn.Module], list[TeacherParts]]:
    """Two different teachers (their feature maps differ in channels), weights 1 : 3."""
    models, parts = [], []
    for seed, (name, arch) in enumerate((("wide", "tiny_cnn_wide"), ("small", "tiny_cnn"))):
        torch.manual_seed(seed + 1)
        model = create_model(arch, num_classes=4, in_channels=1).eval()
        split = split_model(model, INFO.example())
        models.append(model)
        parts.append(TeacherParts(arch, split, {}, name=name, weight=WEIGHTS[seed]))
    return models, parts


def _batch(n: int = 6, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.randn(n, 1, 12, 12, generator=g), torch.randint(0, 4, (n,), generator=g), torch.arange(n))


def _signals(distiller, models, parts) -> EnsembleSignals:
    cpu = torch.device("cpu")
    sources = [OnlineTeacher(m, p.split, distiller.signals, cpu) for m, p in zip(models, parts, strict=True)]
    return EnsembleSignals(sources, WEIGHTS, distiller.ensemble_mode())


def test_simkd_student_of_several_teachers_is_one_module_averaging_each_teachers_head(tmp_path):
    models, parts = _teachers()
    simkd = DISTILLERS.get("simkd")()
    torch.manual_seed(0)
    built = simkd.build_for(parts, "tiny_cnn", INFO, DistillConfig(student="tiny_cnn"))
    model = built.model
    assert isinstance(model, EnsembleSimKDStudent) and built.trainable is model
    assert [t["name"] for t in built.spec["teachers"]] == ["wide", "small"]
    # train a step, so that the projectors and the body are not at their initialisation
    signals = _signals(simkd, models, parts)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    for step in range(2):
        optimizer.zero_grad()
        simkd.loss(built, _batch(seed=step), signals(_batch(seed=step))).backward()
        optimizer.step()
    model.eval()
    x = _batch(seed=5).x
    with torch.no_grad():  # by hand: Σ wᵢ · headᵢ(projectorᵢ(pool(body(x)))), each head the teacher's own, frozen
        f = model.body(x)
        heads = [p.split.head for p in parts]
        maps = [proj(pool(f, size)) for proj, size in zip(model.projector, model.pool_to, strict=True)]
        by_hand = sum(w * head(m) for w, head, m in zip(WEIGHTS, heads, maps, strict=True))
        torch.testing.assert_close(model(x), by_hand)
    for head, p in zip(model.head, parts, strict=True):  # frozen copies of the teachers' heads
        assert all(not q.requires_grad for q in head.parameters())
        for a, b in zip(head.state_dict().values(), p.split.head.state_dict().values(), strict=True):
            torch.testing.assert_close(a, b)
    # its size counts all of it: body, both projectors, both heads
    breakdown = simkd.parameter_breakdown(built)
    assert breakdown["total"] == count_parameters(model) == sum(breakdown[k] for k in ("body", "projector", "head"))
    assert breakdown["projector"] == projector_size(built.spec, 2)
    assert breakdown["head"] == sum(count_parameters(p.split.head) for p in parts)
    # rebuilt from its spec alone (no teacher file), it is the same model
    rebuilt = type(simkd).rebuild(built.spec)
    rebuilt.load_state_dict(model.state_dict())
    torch.testing.assert_close(rebuilt.eval()(x), model(x))
    # and one ONNX graph with parity
    images = _batch(n=16, seed=7).x
    path = tmp_path / "student.onnx"
    export_onnx(model, path, images[:2].clone(), 18, "dynamo", {"role": "student"})
    assert [p.name for p in tmp_path.iterdir()] == ["student.onnx"]  # no external data file: one graph
    parity = check_parity(model, path, images)
    assert parity["max_abs_diff"] <= 1e-4 and parity["top1_agreement"] == 1.0


def test_simkd_loss_is_the_weighted_mean_of_each_projectors_mse():
    models, parts = _teachers()
    simkd = DISTILLERS.get("simkd")()
    torch.manual_seed(0)
    built = simkd.build_for(parts, "tiny_cnn", INFO, DistillConfig(student="tiny_cnn"))
    batch = _batch()
    signals = _signals(simkd, models, parts)(batch)
    assert len(signals["features"]) == 2
    projected = built.model.features(batch.x)
    by_hand = sum(w * F.mse_loss(p, t) for w, p, t in zip(WEIGHTS, projected, signals["features"], strict=True))
    torch.testing.assert_close(simkd.loss(built, batch, signals), by_hand)


def test_kd_target_is_the_mean_of_the_teachers_softened_probabilities():
    student = torch.tensor([[1.0, 0.0, -1.0]])
    teachers = [torch.tensor([[4.0, 0.0, 0.0]]), torch.tensor([[0.0, 4.0, 0.0]])]
    labels = torch.tensor([0])
    t, alpha, weights = 2.0, 0.5, [0.25, 0.75]
    # by hand: softmax([2, 0, 0]) and softmax([0, 2, 0]) at T = 2, mixed 1 : 3
    e2 = math.exp(2)
    p1 = [e2 / (e2 + 2), 1 / (e2 + 2), 1 / (e2 + 2)]
    p2 = [1 / (e2 + 2), e2 / (e2 + 2), 1 / (e2 + 2)]
    target = [0.25 * a + 0.75 * b for a, b in zip(p1, p2, strict=True)]
    z = [math.exp(v / t) for v in (1.0, 0.0, -1.0)]
    q = [v / sum(z) for v in z]
    kl = sum(p * math.log(p / s) for p, s in zip(target, q, strict=True))
    ce = -math.log(math.exp(1) / (math.exp(1) + 1 + math.exp(-1)))
    expected = (1 - alpha) * ce + alpha * t * t * kl
    got = kd_loss(student, teachers, labels, t, alpha, weights=weights)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # the probabilities are averaged, not the logits: KD on the mean logits is another loss
    mean_logits = 0.25 * teachers[0] + 0.75 * teachers[1]
    assert kd_loss(student, mean_logits, labels, t, alpha).item() != pytest.approx(expected, rel=1e-3)
    # one teacher in a list of one is KD itself
    torch.testing.assert_close(kd_loss(student, [teachers[0]], labels, t, alpha, weights=[1.0]),
                               kd_loss(student, teachers[0], labels, t, alpha))  # fmt: skip


def _built(method: str):
    """A student of ``method`` for the two teachers, a batch and the teachers' signals for it."""
    models, parts = _teachers()
    distiller = DISTILLERS.get(method)()
    conf = DistillConfig(student="tiny_cnn", method=method)
    torch.manual_seed(0)
    built = distiller.build_for(parts, "tiny_cnn", INFO, conf)
    batch = _batch()
    return distiller, conf, built, models, parts, batch, _signals(distiller, models, parts)(batch)


def test_kd_of_several_teachers_trains_on_their_averaged_probabilities():
    kd, conf, built, models, _, batch, signals = _built("kd")
    assert [t["weight"] for t in built.spec["teachers"]] == WEIGHTS
    with torch.no_grad():
        logits = [m(batch.x) for m in models]
    for a, b in zip(signals["logits"], logits, strict=True):
        torch.testing.assert_close(a, b)
    expected = kd_loss(built.model(batch.x), logits, batch.y, conf.kd.temperature, conf.kd.alpha, weights=WEIGHTS)
    torch.testing.assert_close(kd.loss(built, batch, signals), expected)


def test_fitnet_sums_one_hint_per_teacher():
    fitnet, conf, built, _, parts, batch, signals = _built("fitnet")
    net = built.trainable
    assert len(net.regressor) == 2
    assert [r[0].out_channels for r in net.regressor] == [p.split.feature_shape[0] for p in parts]
    features = net.body(batch.x)
    hints = [F.mse_loss(r(features), t) for r, t in zip(net.regressor, signals["features"], strict=True)]
    expected = F.cross_entropy(net.head(features), batch.y) + conf.fitnet.beta * (hints[0] + hints[1])
    torch.testing.assert_close(fitnet.loss(built, batch, signals), expected)
    # the deployable is still the plain student
    assert count_parameters(built.model) == count_parameters(create_model("tiny_cnn", num_classes=4, in_channels=1))


def test_logits_only_methods_get_the_weighted_mean_logits_and_feature_pairing_methods_are_refused():
    models, parts = _teachers()
    dkd = DISTILLERS.get("dkd")()
    assert dkd.ensemble_mode() == "mean_logits"
    signals = _signals(dkd, models, parts)(_batch())
    with torch.no_grad():
        mean = 0.25 * models[0](_batch().x) + 0.75 * models[1](_batch().x)
    torch.testing.assert_close(signals["logits"], mean)
    built = dkd.build_for(parts, "tiny_cnn", INFO, DistillConfig(student="tiny_cnn", method="dkd"))
    assert built.spec["teacher_arch"] == "tiny_cnn_wide+tiny_cnn" and len(built.spec["teachers"]) == 2
    assert {DISTILLERS.get(m).ensemble_mode() for m in ("simkd", "kd", "fitnet")} == {"each"}
    assert {DISTILLERS.get(m).ensemble_mode() for m in ("scratch", "zipf_ls")} == {"mean_logits"}  # no teacher
    for method in ("crd", "crd_kd"):
        with pytest.raises(Exception, match=f"{method} cannot learn from several teachers"):
            DISTILLERS.get(method)().build_for(parts, "tiny_cnn", INFO, DistillConfig(student="tiny_cnn"))


def test_the_ensemble_teacher_is_the_weighted_mean_of_logits_and_one_onnx_graph(tmp_path):
    models, _ = _teachers()
    ensemble = Ensemble(models, WEIGHTS, ["wide", "small"]).eval()
    x = _batch(n=16, seed=3).x
    with torch.no_grad():
        torch.testing.assert_close(ensemble(x), 0.25 * models[0](x) + 0.75 * models[1](x))
    path = tmp_path / "teacher.onnx"
    export_onnx(ensemble, path, x[:2].clone(), 18, "dynamo", {"role": "teacher"})
    parity = check_parity(ensemble, path, x)
    assert parity["max_abs_diff"] <= 1e-4
    assert np.isfinite(parity["max_abs_diff"])
    with pytest.raises(ValueError, match="two or more"):
        Ensemble(models[:1], [1.0], ["one"])
