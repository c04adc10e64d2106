"""CRD: the memory update, the NCE loss by hand, its negatives, resuming a killed run with its memory, data-parallel
memories, the image indices every data path gives it, and bad settings refused before any stage runs."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from kdpipe.config import DistillConfig, TrainConfig, load_config
from kdpipe.errors import ConfigError
from kdpipe.ml.data.memory import Batch, load_dataset, make_splits, train_batches
from kdpipe.ml.models.split import split_model
from kdpipe.ml.models.zoo import count_parameters, create_model
from kdpipe.ml.train.training import CHECKPOINT, fit
from kdpipe.runner import run_pipeline
from kdpipe.stages.distillers import DISTILLERS, DataInfo, OnlineTeacher, TeacherParts
from kdpipe.stages.distillers.crd import (
    ContrastMemory,
    contrast_scores,
    draw_negatives,
    nce_loss,
    update_memory,
)
from tests.conftest import TINY, deep_merge


def test_the_memory_update_is_momentum_then_renormalisation():
    memory = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    values = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, -1.0]])
    update_memory(memory, torch.tensor([0, 2, 2]), values, momentum=0.5)
    s = 1 / math.sqrt(2)
    torch.testing.assert_close(memory[0], torch.tensor([s, s]))  # normalise(0.5·[1,0] + 0.5·[0,1])
    torch.testing.assert_close(memory[1], torch.tensor([0.0, 1.0]))  # not in the batch: untouched
    # an image met twice (on two ranks) moves once, towards the mean of its embeddings [0.5, -0.5]
    torch.testing.assert_close(memory[2], F.normalize(torch.tensor([0.3 + 0.25, 0.4 - 0.25]), dim=0))
    assert torch.allclose(memory.norm(dim=1), torch.ones(3))


def test_nce_loss_by_hand():
    scores, temp, log_z, rows = [0.5, 0.1, -0.2], 0.1, 2.0, 10  # the positive first, K = 2 negatives of 10 images
    p = [math.exp(s / temp - log_z) for s in scores]
    noise = 2 / rows
    h = [v / (v + noise) for v in p]
    expected = -math.log(h[0]) - math.log(1 - h[1]) - math.log(1 - h[2])
    got = nce_loss(torch.tensor([scores]), temp, log_z, rows)
    assert math.isclose(got.item(), expected, rel_tol=1e-5)
    huge = nce_loss(torch.tensor([[1.0, -1.0, 1.0]]), 0.001, 0.0, 10)  # exp(1000): no overflow
    assert math.isfinite(huge.item())


@pytest.mark.parametrize("rows", [4, 10])  # the whole-memory product, and gathering the rows (more rows than R·d)
def test_contrast_scores_read_the_chosen_rows(rows):
    g = torch.Generator().manual_seed(0)
    anchor, memory = torch.randn(3, 3, generator=g), torch.randn(rows, 3, generator=g)
    chosen = torch.randint(0, rows, (3, 2), generator=g)
    expected = torch.einsum("bd,brd->br", anchor, memory[chosen])
    torch.testing.assert_close(contrast_scores(anchor, memory, chosen), expected)


def test_negatives_are_uniform_over_the_other_images():
    positives = torch.tensor([0, 3, 4])
    drawn = draw_negatives(positives, 5, 4000, torch.Generator().manual_seed(0))
    for row, pos in enumerate(positives.tolist()):
        counts = torch.bincount(drawn[row], minlength=5)
        assert counts[pos] == 0 and all(counts[k] > 800 for k in range(5) if k != pos)


def test_nce_learns_an_easy_pairing():
    memory = ContrastMemory(torch.arange(8), dim=8, negatives=5, temperature=0.1, momentum=0.5)
    memory.teacher.copy_(torch.eye(8))  # image i's teacher embedding: the i-th axis
    memory.student.copy_(torch.eye(8))
    anchors = nn.Parameter(torch.randn(8, 8, generator=torch.Generator().manual_seed(1)))
    optimizer = torch.optim.Adam([anchors], lr=0.1)
    losses = []
    torch.manual_seed(0)
    for _ in range(100):
        v = F.normalize(anchors, dim=1)
        loss = memory(torch.arange(8), v, torch.eye(8))  # student anchors must find their image's axis
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < 0.5 * losses[0]
    assert torch.equal(F.normalize(anchors, dim=1).argmax(1), torch.arange(8))
    assert memory.log_z.all()  # estimated on the first batch, once


def test_z_is_estimated_on_the_first_batch_and_then_fixed():
    memory = ContrastMemory(torch.arange(0, 40, 2), dim=4, negatives=6, temperature=0.5, momentum=0.5)
    g = torch.Generator().manual_seed(3)
    v_s, v_t = F.normalize(torch.randn(5, 4, generator=g), dim=1), F.normalize(torch.randn(5, 4, generator=g), dim=1)
    index = torch.tensor([0, 8, 10, 22, 38])
    torch.manual_seed(0)
    memory(index, v_s, v_t)
    first = memory.log_z.clone()
    # what the first batch saw: rows updated first, then the positive and 6 negatives per image
    again = ContrastMemory(torch.arange(0, 40, 2), dim=4, negatives=6, temperature=0.5, momentum=0.5)
    torch.manual_seed(0)
    again.student.copy_(memory.student)  # after the update, as the scores were read
    again.teacher.copy_(memory.teacher)
    seed = int(torch.randint(0, 2**62, (1,)))
    rows = again.rows(index)
    cols = torch.cat([rows[:, None], draw_negatives(rows, 20, 6, torch.Generator().manual_seed(seed))], 1)
    s = contrast_scores(v_s, again.teacher, cols)
    torch.testing.assert_close(first[0], (math.log(20) + torch.logsumexp(s.flatten() / 0.5, 0) - math.log(s.numel())))
    memory(index, v_t, v_s)
    assert torch.equal(memory.log_z, first)
    with pytest.raises(RuntimeError, match="outside the training split"):
        memory(torch.tensor([1]), v_s[:1], v_t[:1])


def _teacher(info: DataInfo) -> tuple[nn.Module, TeacherParts]:
    torch.manual_seed(1)
    model = create_model("tiny_cnn_wide", num_classes=info.num_classes, in_channels=1).eval()
    return model, TeacherParts("tiny_cnn_wide", split_model(model, info.example()))


def test_the_embeddings_and_the_memory_train_but_are_not_deployed():
    info = DataInfo(4, (1, 12, 12), ["a", "b", "c", "d"], torch.arange(50))
    model, parts = _teacher(info)
    distiller = DISTILLERS.get("crd_kd")()
    torch.manual_seed(0)
    built = distiller.build(parts, "tiny_cnn", info, DistillConfig(student="tiny_cnn", crd={"negatives": 10}))
    plain = count_parameters(create_model("tiny_cnn", num_classes=4, in_channels=1))
    assert count_parameters(built.model) == plain == distiller.parameter_breakdown(built)["total"]
    assert set(built.trainable.state_dict()) - set(built.model.state_dict()) >= {"memory.student", "memory.teacher"}
    assert built.trainable.memory.student.shape == (50, 128)
    batch = Batch(torch.randn(6, 1, 12, 12), torch.randint(0, 4, (6,)), torch.arange(6) * 7)
    teacher = OnlineTeacher(model, parts.split, distiller.signals, torch.device("cpu"))(batch)
    assert set(teacher) == {"features", "logits"}
    built.trainable.train()
    before = built.trainable.memory.student.clone()
    loss = distiller.loss(built, batch, teacher)
    loss.backward()
    changed = (built.trainable.memory.student != before).any(1)
    assert changed.nonzero().flatten().tolist() == (torch.arange(6) * 7).tolist()
    assert all(p.grad is not None for p in [*built.model.parameters(), *built.trainable.embed_t.parameters()])


class Killed(Exception):
    pass


def _fit_crd(splits, cfg, work_dir, kill_at_step=None, nproc=1, epochs=3):
    info = DataInfo(4, (1, 12, 12), ["a", "b", "c", "d"], splits.train_idx)
    model, parts = _teacher(info)
    distiller = DISTILLERS.get("crd")()
    torch.manual_seed(0)
    built = distiller.build(parts, "tiny_cnn", info, DistillConfig(student="tiny_cnn", crd={"negatives": 32}))
    signals = OnlineTeacher(model, parts.split, distiller.signals, torch.device("cpu"))
    calls = {"n": 0}

    def loss_fn(batch):
        calls["n"] += 1
        if calls["n"] == kill_at_step:
            raise Killed
        return distiller.loss(built, batch, signals(batch))

    start = built.trainable.memory.student.clone()
    fit(
        model=built.trainable, trainable=built.trainable, loss_fn=loss_fn, splits=splits,
        conf=TrainConfig(epochs=epochs, batch_size=32 // nproc, lr=0.05, seed=3), augment=cfg.config.data.augment,
        work_dir=work_dir, device=torch.device("cpu"), desc="t", progress=False, log=lambda s: None, nproc=nproc,
    )  # fmt: skip
    return built, start, calls["n"]


def test_a_killed_run_resumes_with_its_memory(write_config, tmp_path):
    cfg = load_config(write_config())
    splits = make_splits(cfg, load_dataset(cfg))
    straight, start, _ = _fit_crd(splits, cfg, tmp_path / "a")
    work = tmp_path / "b"
    with pytest.raises(Killed):
        _fit_crd(splits, cfg, work, kill_at_step=8)  # mid second epoch (173 images: 6 steps an epoch)
    assert (work / CHECKPOINT).is_file()
    resumed, _, steps = _fit_crd(splits, cfg, work)
    assert steps == 12  # epochs 2 and 3 only
    saved = torch.load(work / CHECKPOINT, weights_only=True)["model"]
    assert {"memory.student", "memory.teacher", "memory.log_z"} <= set(saved)
    for k, v in straight.trainable.state_dict().items():
        torch.testing.assert_close(resumed.trainable.state_dict()[k], v, rtol=0, atol=0)
    assert (straight.trainable.memory.student != start).any(1).all()  # every training image's row moved


DATA_PARALLEL = """
import json, torch
from pathlib import Path
from kdpipe.config import load_config
from kdpipe.ml.data.memory import load_dataset, make_splits
from tests.stages.test_crd import _fit_crd
torch.set_num_threads(1)
cfg = load_config({config!r})
splits = make_splits(cfg, load_dataset(cfg))
built, start, _ = _fit_crd(splits, cfg, Path({root!r}), nproc=2, epochs=1)
memory = built.trainable.memory
norms = torch.cat([memory.student.norm(dim=1), memory.teacher.norm(dim=1)])
print(json.dumps({{"rows_moved": int((memory.student != start).any(1).sum()), "rows": len(start),
                   "log_z": memory.log_z.tolist(), "norm_error": (norms - 1).abs().max().item()}}))
"""


def test_two_ranks_keep_one_memory_updated_with_every_ranks_images(write_config, tmp_path):
    """2 gloo ranks, one epoch: each rank sees half of each batch, yet rank 0's memory moved on every training
    image (the updates are all-gathered; 173 images: the last global batch splits 7 / 6)."""
    from tests.stages.test_training import _in_fresh_python

    config = write_config()
    r = _in_fresh_python(DATA_PARALLEL.format(config=str(config), root=str(tmp_path / "ddp")))
    assert r["rows_moved"] == r["rows"] == 173 and all(z != 0 for z in r["log_z"])
    assert r["norm_error"] < 1e-5  # each row normalised once, the same on both ranks (averaging them changes nothing)


def test_every_data_path_gives_the_training_rows(write_config, tmp_path):
    """CRD indexes its memory by Batch.index: in memory the dataset index, streamed files their list row, streamed
    shards the sample's row in the training split: each within the training split, every image once an epoch."""
    from kdpipe.config import LoadedConfig, parse_config
    from kdpipe.ml.data.imagedata import open_data
    from tests.image_data import make_imagefolder, write_shards

    cfg = load_config(write_config())
    splits = make_splits(cfg, load_dataset(cfg))
    seen = torch.cat([b.index for b in train_batches(splits, 32, 0, 0, cfg.config.data.augment)])
    assert sorted(seen.tolist()) == splits.train_idx.tolist()
    folder = make_imagefolder(tmp_path / "img", train=8, test=2, size=16)
    forms = {
        "files": {"dataset": "imagefolder", "root": str(folder), "in_memory": False},
        "shards": {"dataset": "webdataset", "shards": write_shards(folder, tmp_path / "shards", per_shard=7)},
    }
    for form, data in forms.items():
        c = LoadedConfig(parse_config({"data": {**data, "image_size": 16, "workers": 0}}), None)
        streamed_data, streamed = open_data(c)
        batches = list(train_batches(streamed, 4, 0, 1, c.config.data.augment))
        seen, labels = torch.cat([b.index for b in batches]), torch.cat([b.y for b in batches])
        assert len(set(seen.tolist())) == len(seen) >= len(streamed.train_idx) - 4, form  # whole batches only
        assert set(seen.tolist()) <= set(streamed.train_idx.tolist()), form
        assert torch.equal(streamed_data.train_y[seen], labels), form  # the row is this very image's
        assert len(streamed.train_idx) + len(streamed.val_y) == 24, form


@pytest.mark.parametrize(
    ("crd", "message"),
    [
        ({"negatives": 0}, r"distill.crd.negatives: must be > 0"),
        ({"embed_dim": 0}, r"distill.crd.embed_dim: must be >= 1"),
        ({"momentum": 1.0}, r"distill.crd.momentum: must be < 1"),
        ({"temperature": -0.07}, r"distill.crd.temperature: must be > 0"),
        ({"beta": -1}, r"distill.crd.beta: must be >= 0"),
    ],
)
def test_bad_crd_settings_are_one_line_errors(write_config, crd, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write_config({"distill": {"method": "crd", "crd": crd}}))


@pytest.mark.parametrize(
    ("extra", "names"),
    [
        ({"distill": {"compare": ["crd"]}}, ("distill.crd.negatives", "16384 negatives", "has 173")),
        ({"distill": {"method": "crd_kd", "crd": {"negatives": 173}}}, ("distill.crd.negatives", "has 173")),
        ({"distill": {"method": "crd", "compare": ["kd", "crdd"]}}, ("distill.compare.1", "'crdd'")),
        ({"distill": {"compare": ["dkd"], "dkd": {"beta": -8}}}, ("distill.dkd.beta", ">= 0")),
    ],
)
def test_bad_input_is_refused_by_the_cli_before_any_stage(tmp_path, monkeypatch, capsys, extra, names):
    from kdpipe.stages import STAGES
    from tests.e2e.test_bad_input import assert_one_line_exit_2, run_cli

    ran = []
    for name in STAGES:
        monkeypatch.setattr(STAGES.get(name), "run", lambda self, ctx, _n=name: ran.append(_n))
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(deep_merge(TINY, extra)))
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(capsys, "run")
    assert_one_line_exit_2(code, err, *names, "pipeline.yaml")
    assert ran == []


def test_crd_dkd_and_zipf_compared_end_to_end(write_config):
    """The three new methods beside scratch on the synthetic data, with cached teacher features: each trains,
    reports its row, and the deployed CRD student is the plain student."""
    extra = {
        "features": {"enabled": True, "views": 2},
        "distill": {
            "method": "crd", "compare": ["dkd", "zipf_ls", "scratch"], "train": {"epochs": 2},
            "crd": {"negatives": 64, "embed_dim": 16}, "dkd": {"warmup": 1},
        },
    }  # fmt: skip
    report = run_pipeline(write_config(extra), until="distill", echo=lambda s: None)
    rows = {r["method"]: r for r in report["comparison"]}
    assert list(rows) == ["crd", "dkd", "zipf_ls", "scratch"]
    assert [rows[m]["uses_teacher"] for m in rows] == [True, True, False, False]
    assert all(0 <= r["test_top1"] <= 1 and r["seconds"] > 0 for r in rows.values())
    student = report["models"]["student"]
    assert student["method"] == "crd" and student["parameters"] == rows["scratch"]["parameters"]
    assert json.dumps(report)  # the report stays JSON
