import torch
from torch import nn

from kdpipe.ml.data.memory import Batch
from kdpipe.ml.models.split import split_model
from kdpipe.ml.models.zoo import create_model
from kdpipe.stages.distillers import Built, spec_shapes
from kdpipe.stages.distillers.simkd import Projector, SimKD, SimKDStudent


def test_projector_is_the_papers():
    p = Projector(64, 256, factor=2)
    convs = [m for m in p if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (64, 128, (1, 1)), (128, 128, (3, 3)), (128, 256, (1, 1)),
    ]  # fmt: skip
    assert all(c.bias is None for c in convs)
    assert [type(m).__name__ for m in p][:3] == ["Conv2d", "BatchNorm2d", "ReLU"] and len(p) == 9
    assert sum(c.out_channels for c in Projector(64, 256, factor=4) if isinstance(c, nn.Conv2d)) == 64 + 64 + 256


def _pair(student="tiny_cnn", teacher="tiny_cnn_wide", size=16):
    x = torch.randn(4, 1, size, size)
    t_model = create_model(teacher, num_classes=3, in_channels=1).eval()
    t = split_model(t_model, x)
    s = split_model(create_model(student, num_classes=3, in_channels=1), x)
    shapes = spec_shapes(s.feature_shape, t.feature_shape)
    model = SimKDStudent(s.body, Projector(s.feature_shape[0], t.feature_shape[0]), t.head, shapes["student_pool_to"])
    return x, t, model, shapes


def test_student_reuses_the_frozen_teacher_head_and_only_mse_trains_body_and_projector():
    x, t, student, shapes = _pair()
    built = Built(model=student, trainable=student, spec={"teacher_pool_to": shapes["teacher_pool_to"]})
    head_before = {k: v.clone() for k, v in student.head.state_dict().items()}
    student.train()
    assert not student.head.training
    with torch.no_grad():
        teacher = {"features": t.body(x)}
    loss = SimKD().loss(built, Batch(x, torch.zeros(len(x), dtype=torch.long), torch.arange(len(x))), teacher)
    with torch.no_grad():
        expected = nn.functional.mse_loss(student.features(x), t.body(x))
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert all(p.grad is not None for p in student.body.parameters())
    assert all(p.grad is not None for p in student.projector.parameters())
    assert all(p.grad is None for p in student.head.parameters())
    assert all(torch.equal(v, student.head.state_dict()[k]) for k, v in head_before.items())
    student.eval()
    torch.testing.assert_close(student(x), t.head(student.projector(student.body(x))))


def test_the_larger_map_is_pooled_to_the_smaller():
    # resnet8 keeps 7x7 at 28 px; mobilenetv2 ends at 2x2: the student map is pooled down before the projector
    x = torch.randn(2, 1, 28, 28)
    s = split_model(create_model("resnet8", 10, 1), x)
    t = split_model(create_model("mobilenetv2", 10, 1), x)
    shapes = spec_shapes(s.feature_shape, t.feature_shape)
    assert shapes["student_pool_to"] == [2, 2] and shapes["teacher_pool_to"] is None
    shapes = spec_shapes(t.feature_shape, s.feature_shape)
    assert shapes["teacher_pool_to"] == [2, 2] and shapes["student_pool_to"] is None
    model = SimKDStudent(s.body, Projector(s.feature_shape[0], t.feature_shape[0]), t.head, [2, 2]).eval()
    assert model(x).shape == (2, 10)


def test_rebuild_from_spec_without_the_teacher_checkpoint():
    x, _, student, shapes = _pair()
    spec = {
        "student_arch": "tiny_cnn", "teacher_arch": "tiny_cnn_wide", "student_feature_node": None,
        "teacher_feature_node": None, "factor": 2, "num_classes": 3, "in_channels": 1, "input_shape": [1, 16, 16],
        **shapes,
    }  # fmt: skip
    rebuilt = SimKD.rebuild(spec)
    rebuilt.load_state_dict(student.state_dict())
    torch.testing.assert_close(rebuilt.eval()(x), student.eval()(x))


def test_short_preset_adds_label_and_logit_terms_through_the_reused_head():
    """``simkd`` defaults to the paper's MSE alone; the short preset adds CE with the labels and T²·KL to the
    teacher's logits, both on the frozen head's logits, so their gradients reach body and projector only."""
    from kdpipe.config import DistillConfig, SimKDConfig
    from kdpipe.stages.distillers.kd import kd_loss
    from kdpipe.stages.distillers.simkd import simkd_terms

    assert simkd_terms(DistillConfig())["ce_weight"] == 0 and simkd_terms(DistillConfig())["kd_weight"] == 0
    terms = simkd_terms(DistillConfig(simkd=SimKDConfig(preset="short")))
    assert terms["ce_weight"] > 0 and terms["kd_weight"] > 0
    assert simkd_terms(DistillConfig(simkd=SimKDConfig(preset="short", kd_weight=0)))["kd_weight"] == 0

    x, t, student, shapes = _pair()
    y = torch.tensor([0, 1, 2, 1])
    spec = {"teacher_pool_to": shapes["teacher_pool_to"], "ce_weight": 0.5, "kd_weight": 2.0, "temperature": 3.0}
    student.train()
    with torch.no_grad():
        teacher = {"features": t.body(x)}
    loss = SimKD().loss(Built(student, student, spec), Batch(x, y, torch.arange(4)), teacher)
    with torch.no_grad():
        logits = student.head(student.features(x))
        mse = nn.functional.mse_loss(student.features(x), teacher["features"])
        ce = nn.functional.cross_entropy(logits, y)
        soft = kd_loss(logits, t.head(teacher["features"]), y, 3.0, alpha=1.0)
    torch.testing.assert_close(loss, mse + 0.5 * ce + 2.0 * soft)
    loss.backward()
    assert all(p.grad is None for p in student.head.parameters())
