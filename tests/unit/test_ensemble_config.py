"""`teachers:`, several named teachers: what the config accepts and refuses, and how the plan keys each teacher's
work on its own (a teacher's entries are a single-teacher run's), without torch."""

from __future__ import annotations

import pytest

from kdpipe.cache import cache_key, key_payload, library_versions
from kdpipe.config import ConfigError, LoadedConfig, load_config, parse_config
from kdpipe.fileio import FileDigests
from kdpipe.ml.data.sources import dataset_fingerprint
from kdpipe.runner import plan
from kdpipe.stages import ORDER, STAGES
from tests.conftest import TINY

TEACHER = TINY["teacher"]
TWO = {
    "teachers": [
        {"name": "a", **TEACHER},
        {"name": "b", **TEACHER, "arch": "tiny_cnn", "weight": 3},
    ]
}


def several(extra: dict | None = None) -> dict:
    base = {k: v for k, v in TINY.items() if k != "teacher"}
    return {**base, **TWO, **(extra or {})}


def keys(path, *overrides) -> dict[str, str]:
    return {s.stage: s.key for s in plan(load_config(path, list(overrides)))}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({**TINY, **TWO}, "teacher and teachers are both given"),
        (several({"teachers": [{"name": "a"}]}), "teachers: lists one teacher; one teacher is `teacher:`"),
        (several({"teachers": [{"name": "a"}, {"name": "a"}]}), "teachers.1.name: 'a' is also teachers.0's name"),
        (several({"teachers": [{"name": "teacher"}, {"name": "b"}]}), "teachers.0.name: 'teacher' is reserved"),
        (several({"teachers": [{"name": "a"}, {"name": "student-x"}]}), "teachers.1.name: 'student-x' is reserved"),
        (several({"teachers": [{"name": "a b"}, {"name": "b"}]}), "teachers.0.name: 'a b': use letters"),
        (several({"teachers": [{"name": "a", "weight": 0}, {"name": "b"}]}), "teachers.0.weight: must be > 0"),
        (several({"teachers": [{"arch": "tiny_cnn"}, {"name": "b"}]}), "teachers.0.name: is required"),
        (
            several({"teachers": [{"name": "a", "path": "shipped:fashion_mnist_wrn16_2"}, {"name": "b"}]}),
            "teachers.0.path: shipped:fashion_mnist_wrn16_2 was trained on fashion_mnist",
        ),
    ],
)
def test_bad_teacher_lists_are_one_line_naming_the_key(data, message):
    with pytest.raises(ConfigError) as err:
        parse_config(data, "pipeline.yaml")
    assert message in str(err.value) and str(err.value).endswith("(pipeline.yaml)")
    assert "\n" not in str(err.value)


def test_names_weights_and_each_teachers_view():
    cfg = LoadedConfig(parse_config(several()), None)
    assert cfg.several_teachers and cfg.teacher_names == ["a", "b"]
    assert cfg.teacher_weights == [0.25, 0.75]  # normalised
    single = LoadedConfig(parse_config({**TINY, "teacher": {**TEACHER, "arch": "tiny_cnn"}}), None)
    assert cfg.for_teacher("b").section("teacher") == single.section("teacher")  # no name, no weight
    assert cfg.for_teacher("b").member == ("teachers.1", "b") and cfg.teacher_key("b") == "teachers.1"
    with pytest.raises(ConfigError, match=r"^teachers\.1\.path: no such file"), cfg.for_teacher("b").member_errors():
        raise ConfigError("teacher.path", "no such file")
    one = LoadedConfig(parse_config(TINY), None)
    assert not one.several_teachers and one.teacher_names == ["teacher"] and one.teacher_weights == [1.0]
    assert one.for_teacher("teacher") is one and one.teacher_key("teacher") == "teacher"


def test_each_teacher_is_planned_and_keyed_as_a_single_teacher_run_of_it(write_config):
    ensemble = keys(write_config(name="ensemble.yaml", base=several()))
    assert list(ensemble) == [
        "teacher:a", "teacher:b", "features:a", "features:b", "distill", "validate", "export", "benchmark",
    ]  # fmt: skip
    alone = keys(write_config({"teacher": {"arch": "tiny_cnn"}}, name="b.yaml"))
    assert (ensemble["teacher:b"], ensemble["features:b"]) == (alone["teacher"], alone["features"])
    assert ensemble["teacher:a"] == keys(write_config(name="a.yaml"))["teacher"]
    assert ensemble["distill"] != alone["distill"]


def test_changing_one_teacher_changes_only_its_own_work_and_what_reads_every_teacher(write_config):
    path = write_config(base=several())
    base = keys(path)
    changed = keys(path, "teachers.1.train.lr=0.2")
    assert [s for s in base if changed[s] != base[s]] == [
        "teacher:b", "features:b", "distill", "validate", "export", "benchmark",
    ]  # fmt: skip
    weight = keys(path, "teachers.1.weight=1")  # how the teachers are averaged: the student, not the teachers
    assert [s for s in base if weight[s] != base[s]] == ["distill", "validate", "export", "benchmark"]


def test_a_single_teacher_plan_is_the_plan_it_always_was(write_config):
    """Keys computed the way the runner did before teachers were a list: one step per stage, upstream keys by stage
    name, the stage's config as it was: the plan of a `teacher:` config must not have moved."""
    for extra in ({}, {"features": {"enabled": True}, "distill": {"method": "kd", "compare": ["simkd"]}}):
        cfg = load_config(write_config(extra))
        memo = FileDigests(cfg.cache_dir / "fingerprints.json")
        old: dict[str, str] = {}
        for name in ORDER:
            stage = STAGES.get(name)()
            external = stage.external(cfg, memo)
            if stage.uses_data:
                external = {"dataset": dataset_fingerprint(cfg, memo), **external}
            config = stage.config(cfg)
            assert "teachers" not in config
            payload = key_payload(name, stage.version, config, {n: old[n] for n in stage.needs}, external,
                                  library_versions(stage.libraries))  # fmt: skip
            old[name] = cache_key(payload)
        steps = plan(cfg)
        assert {s.stage: s.key for s in steps} == old
        assert all(s.kind == s.stage and s.teacher is None for s in steps)


def test_status_lists_every_teacher(write_config, capsys):
    from kdpipe.cli import main

    assert main(["status", "-c", str(write_config(base=several()))]) == 0
    out = capsys.readouterr().out
    assert "teacher:a" in out and "teacher:b" in out and "features:b" in out
