"""Data-free distillation's generator: each loss term on tiny models, collapse detection, the batch source, and a
killed data-free training that resumes to the same result."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from kdpipe.config import Augment, DataFreeConfig, TrainConfig, load_config
from kdpipe.ml.data.memory import load_dataset, make_splits
from kdpipe.ml.models.zoo import create_model
from kdpipe.ml.train.datafree import (
    BNStatistics,
    Generator,
    SyntheticSource,
    adversarial_term,
    batchnorm_layers,
    bn_term,
    class_balance,
    class_term,
    collapse,
    diversity_term,
    easy_mask,
    entropy_term,
    ramp,
)
from kdpipe.ml.train.training import CHECKPOINT, fit


def _bn_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 4))


def test_bn_term_is_zero_when_the_batch_has_the_stored_statistics():
    torch.manual_seed(0)
    model = _bn_model().eval()
    x = torch.randn(16, 1, 4, 4)
    conv_out = model[0](x)
    bn = model[1]
    with torch.no_grad():  # the statistics the teacher "stored" are exactly this batch's
        bn.running_mean.copy_(conv_out.mean((0, 2, 3)))
        bn.running_var.copy_(conv_out.var((0, 2, 3), unbiased=False))
    stats = BNStatistics(model)
    with stats.recording() as distances:
        model(x)
    assert len(distances) == 1
    assert bn_term(distances).item() == pytest.approx(0.0, abs=1e-5)
    with stats.recording() as distances:
        model(x * 3 + 1)  # another batch: its statistics are not the stored ones
    assert bn_term(distances).item() > 0.5
    model(x)  # outside recording the hooks do nothing
    assert stats.distances is None
    stats.remove()
    assert not bn._forward_hooks


def test_bn_term_gradient_moves_the_input_towards_the_stored_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm2d(1), _bn_model()).eval()  # stored: mean 0, var 1 at the input
    x = (torch.randn(8, 1, 4, 4) * 4 + 3).requires_grad_(True)
    stats = BNStatistics(model)
    before = None
    opt = torch.optim.Adam([x], lr=0.1)
    for _ in range(30):
        with stats.recording() as distances:
            model(x)
        loss = bn_term(distances)
        before = loss.item() if before is None else before
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * before


def test_a_model_without_batchnorm_and_a_torchscript_one_have_no_layers_to_hook():
    plain = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    assert batchnorm_layers(plain) == []
    assert batchnorm_layers(torch.jit.script(_bn_model())) == []
    assert len(batchnorm_layers(create_model("tiny_cnn", num_classes=4, in_channels=1))) == 2


def test_entropy_term_is_zero_for_a_uniform_batch_and_log_k_for_one_class():
    k = 5
    uniform = torch.eye(k).repeat(4, 1) * 20  # every class equally often, confidently
    assert entropy_term(uniform).item() == pytest.approx(0.0, abs=1e-6)
    one_class = torch.zeros(20, k)
    one_class[:, 2] = 30
    assert entropy_term(one_class).item() == pytest.approx(math.log(k), abs=1e-4)
    assert 0 < entropy_term(torch.randn(20, k)).item() < math.log(k)


def test_class_term_is_the_cross_entropy_with_the_targets():
    logits = torch.tensor([[5.0, 0.0], [0.0, 5.0]])
    low = class_term(logits, torch.tensor([0, 1])).item()
    high = class_term(logits, torch.tensor([1, 0])).item()
    assert low < 0.01 < 4 < high


def test_adversarial_term_minimised_drives_student_and_teacher_apart():
    torch.manual_seed(0)
    teacher, student = nn.Linear(6, 3), nn.Linear(6, 3)
    x = torch.randn(32, 6, requires_grad=True)
    gap = lambda: (student(x) - teacher(x)).abs().mean().item()  # noqa: E731
    start = gap()
    opt = torch.optim.SGD([x], lr=0.1)
    for _ in range(10):
        loss = adversarial_term(student(x), teacher(x))
        assert loss.item() <= 0
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert gap() > start


def test_diversity_term_is_large_for_one_image_per_class_and_its_gradient_spreads_them():
    torch.manual_seed(0)
    z = torch.randn(8, 4)
    targets = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])
    same = torch.rand(2, 1, 3, 3)[targets]  # every image of a class alike whatever z is
    spread = torch.rand(8, 1, 3, 3)
    assert diversity_term(same, z, targets) > 10 * diversity_term(spread, z, targets)
    assert diversity_term(spread, z, torch.arange(8)).item() == 0  # no pair of one class
    x = (same + 0.01 * torch.randn_like(same)).requires_grad_(True)
    opt = torch.optim.SGD([x], lr=0.01)
    start = diversity_term(x, z, targets).item()
    for _ in range(5):
        loss = diversity_term(x, z, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert diversity_term(x, z, targets).item() < start


def test_easy_mask_and_the_curriculum_ramp():
    s = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
    t = torch.tensor([[3.0, 0.0], [3.0, 0.0], [0.0, 1.0]])
    assert easy_mask(s, t).tolist() == [1.0, 0.0, 0.0]
    masked = adversarial_term(s, t, easy_mask(s, t))
    assert masked.item() == pytest.approx(-(1.0 + 0.0) / 2 / 3)  # only the first image counts
    assert [ramp(step, 100, 0.5) for step in (0, 25, 50, 99)] == [0.0, 0.5, 1.0, 1.0]
    assert ramp(0, 100, 0.0) == 1.0


def test_collapse_is_named_for_one_dominant_class_or_a_low_entropy():
    assert collapse(class_balance(torch.tensor([25, 25, 25, 25])), 0.5, 0.5) is None
    one = collapse(class_balance(torch.tensor([70, 10, 10, 10])), 0.5, 0.5, ["a", "b", "c", "d"])
    assert one is not None and "'a'" in one and "70%" in one
    spread = class_balance(torch.tensor([45, 45, 0, 0, 0, 0, 0, 0, 0, 10]))
    assert spread["largest_share"] < 0.5 and spread["entropy"] < 0.5
    assert "entropy" in collapse(spread, 0.5, 0.5)
    assert collapse(class_balance(torch.zeros(4, dtype=torch.long)), 0.5, 0.5) is None


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (1, 12, 12), (3, 30, 20)])
def test_generator_makes_images_of_the_data_shape_in_unit_range(shape):
    torch.manual_seed(0)
    for conditional in (True, False):
        g = Generator(16, 4, shape, width=8, conditional=conditional)
        y = torch.tensor([0, 1, 2]) if conditional else None
        x = g(torch.randn(3, 16), y)
        assert tuple(x.shape) == (3, *shape)
        assert x.min() >= 0 and x.max() <= 1


def test_mixed_targets_are_balanced_and_weigh_their_class_at_least_half(tiny):
    cfg, splits, teacher = tiny
    student = create_model("tiny_cnn", num_classes=4, in_channels=1)
    y, q = _source(cfg, splits, teacher, student, mix=0.5).targets(400, torch.Generator().manual_seed(0))
    assert torch.bincount(y).tolist() == [100] * 4
    torch.testing.assert_close(q.sum(1), torch.ones(400))
    assert (q.argmax(1) == y).all() and (q[torch.arange(400), y] >= 0.5).all()
    mixed = (q > 0).sum(1) == 2
    assert 0.4 < mixed.float().mean() < 0.6 and ((q > 0).sum(1) <= 2).all()
    _, plain = _source(cfg, splits, teacher, student, mix=0.0).targets(8, torch.Generator().manual_seed(0))
    assert ((plain == 0) | (plain == 1)).all()


def test_a_one_hot_target_embeds_as_its_class_index():
    torch.manual_seed(0)
    g = Generator(8, 4, (1, 12, 12), width=8).eval()
    z, y = torch.randn(4, 8), torch.tensor([0, 3, 1, 2])
    torch.testing.assert_close(g(z, y), g(z, torch.nn.functional.one_hot(y, 4).float()))


def _source(cfg, splits, teacher, student, stored=False, **conf) -> SyntheticSource:
    data = splits.data
    torch.manual_seed(0)
    gen = Generator(8, data.num_classes, tuple(data.input_shape), width=8)
    datafree = DataFreeConfig(
        **{"batch_size": 8, "extra_images": 4, "steps_per_epoch": 4, "pool_size": 24, "samples": 8, **conf}
    )
    weights = {t: getattr(datafree, t) for t in ("bn", "ce", "entropy", "diversity", "adversarial")}
    return SyntheticSource(
        gen, teacher, student, datafree, weights, data.num_classes, data.mean, data.std, Augment(), 16, 3, 0,
        torch.device("cpu"), data.classes, stored=stored,
    )  # fmt: skip


@pytest.fixture
def tiny(write_config):
    cfg = load_config(write_config())
    splits = make_splits(cfg, load_dataset(cfg))
    torch.manual_seed(1)
    teacher = create_model("tiny_cnn_wide", num_classes=4, in_channels=1).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return cfg, splits, teacher


def test_source_trains_the_generator_and_fills_the_pool_without_touching_the_student(tiny):
    cfg, splits, teacher = tiny
    student = create_model("tiny_cnn", num_classes=4, in_channels=1)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    source = _source(cfg, splits, teacher, student, adversarial_ramp=0.0, generator_every=2, pool_size=48)
    g_before = {k: v.clone() for k, v in source.generator.state_dict().items()}
    batches = list(source.batches(0))
    assert len(batches) == 4 and all(b.x.shape == (16, 1, 12, 12) for b in batches)
    assert source.generator_steps == 2 and source.pool.dtype == torch.uint8
    assert len(source.pool) == len(source.pool_logits) == 2 * (8 + 4)  # each step's 8 images and 4 extra ones
    assert not all(torch.equal(v, source.generator.state_dict()[k]) for k, v in g_before.items())
    for k, v in before.items():  # the adversarial term reads the student; only the training loop updates it
        assert torch.equal(v, student.state_dict()[k]), k
    assert all(p.grad is None for p in student.parameters())
    record = source.epoch_record()["generator"]
    assert record["steps"] == 2 and sum(record["class_counts"]) == 24
    assert set(record["terms"]) == {"bn", "ce", "entropy", "diversity", "adversarial"}
    assert record["same_class_distance"] > 0
    images, labels = source.samples(8)
    assert images.shape == (8, 1, 12, 12) and labels.shape == (8,)


def test_stored_replay_gives_the_pool_images_as_generated_with_the_teachers_logits(tiny):
    cfg, splits, teacher = tiny
    student = create_model("tiny_cnn", num_classes=4, in_channels=1)
    stored = _source(cfg, splits, teacher, student, stored=True)
    augmented = _source(cfg, splits, teacher, student)
    for a, b in zip(stored.batches(0), augmented.batches(0), strict=True):
        plain = (stored.pool[a.index].float() / 255 - splits.data.mean[0]) / splits.data.std[0]
        torch.testing.assert_close(a.x, plain)  # as generated: no crop, no flip
        with torch.no_grad():  # the logits of the image before rounding to uint8: within a rounding's reach
            torch.testing.assert_close(stored.teacher_signals(a)["logits"], teacher(a.x), atol=0.05, rtol=0)
        assert not torch.equal(b.x, (augmented.pool[b.index].float() / 255 - splits.data.mean[0]) / splits.data.std[0])
    with pytest.raises(RuntimeError, match="another batch"):
        stored.teacher_signals(a.__class__(a.x[:3], a.y[:3], a.index[:3]))


def test_source_state_round_trips(tiny):
    cfg, splits, teacher = tiny
    student = create_model("tiny_cnn", num_classes=4, in_channels=1)
    a = _source(cfg, splits, teacher, student)
    list(a.batches(0))
    b = _source(cfg, splits, teacher, student)
    b.load_state_dict(copy.deepcopy(a.state_dict()))  # as a checkpoint would: no tensor shared with a
    xa = [batch.x for batch in a.batches(1)]
    xb = [batch.x for batch in b.batches(1)]
    for u, v in zip(xa, xb, strict=True):
        torch.testing.assert_close(u, v, rtol=0, atol=0)


class Killed(Exception):
    pass


def _fit(cfg, splits, teacher, work_dir, kill_at_step=None):
    torch.manual_seed(0)
    student = create_model("tiny_cnn", num_classes=4, in_channels=1)
    source = _source(cfg, splits, teacher, student)
    calls = {"n": 0}

    def loss_fn(batch):
        calls["n"] += 1
        if calls["n"] == kill_at_step:
            raise Killed
        with torch.no_grad():
            t = teacher(batch.x)
        return nn.functional.kl_div(student(batch.x).log_softmax(1), t.softmax(1), reduction="batchmean")

    result = fit(
        model=student, trainable=student, loss_fn=loss_fn, splits=splits, augment=Augment(), work_dir=work_dir,
        conf=TrainConfig(epochs=3, batch_size=16, lr=0.05, seed=3), device=torch.device("cpu"), desc="t",
        progress=False, log=lambda s: None, source=source,
    )  # fmt: skip
    return student, source, result, calls["n"]


def test_killed_data_free_training_resumes_to_the_same_student_and_generator(tiny, tmp_path):
    cfg, splits, teacher = tiny
    straight, g_straight, res_a, _ = _fit(cfg, splits, teacher, tmp_path / "a")
    work = tmp_path / "b"
    with pytest.raises(Killed):
        _fit(cfg, splits, teacher, work, kill_at_step=7)  # mid second epoch (4 steps an epoch)
    assert (work / CHECKPOINT).is_file()
    resumed, g_resumed, res_b, steps = _fit(cfg, splits, teacher, work)
    assert steps == 8  # epochs 2 and 3 only
    for k, v in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, rtol=0, atol=0)
    for k, v in g_straight.generator.state_dict().items():
        torch.testing.assert_close(g_resumed.generator.state_dict()[k], v, rtol=0, atol=0)
    torch.testing.assert_close(g_resumed.pool, g_straight.pool, rtol=0, atol=0)
    assert [h["val_top1"] for h in res_a["history"]] == [h["val_top1"] for h in res_b["history"]]
    assert [h["generator"]["class_counts"] for h in res_a["history"]] == [
        h["generator"]["class_counts"] for h in res_b["history"]
    ]
