from pathlib import Path

import pytest

from kdpipe.config import PipelineConfig, load_config, parse_config
from kdpipe.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def error_of(tmp_path: Path, text: str) -> ConfigError:
    path = tmp_path / "pipeline.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value


def test_defaults_and_repo_configs_validate():
    assert PipelineConfig().distill.method == "simkd"
    for path in [REPO / "pipeline.yaml", *sorted((REPO / "configs").glob("*.yaml"))]:
        load_config(path)


def test_every_field_has_a_description():
    def walk(model):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
            ann = field.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                walk(ann)

    walk(PipelineConfig)


def test_misspelled_key_names_path_file_and_suggestion(tmp_path):
    err = error_of(tmp_path, "distill:\n  train:\n    epocs: 3\n")
    assert str(err) == "distill.train.epocs: unknown key; did you mean 'epochs'? (pipeline.yaml)"
    assert err.exit_code == 2
    assert "\n" not in str(err)


def test_impossible_value(tmp_path):
    err = error_of(tmp_path, "distill:\n  train:\n    epochs: 0\n")
    assert str(err) == "distill.train.epochs: must be > 0 (pipeline.yaml)"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("teacher:\n  source: s3\n", "teacher.source: must be one of"),
        ("benchmark:\n  warmup: many\n", "benchmark.warmup: must be an integer, got 'many'"),
        ("benchmark:\n  intra_op_threads: many\n", "benchmark.intra_op_threads: must be a list, got 'many'"),
        ("data: [1, 2]\n", "data: must be a mapping"),
        ("teacher:\n  source: checkpoint\n", "teacher: source 'checkpoint' needs `path`"),
        ("benchmark:\n  batch_sizes: []\n", "benchmark: batch_sizes must be a non-empty list"),
        ("export:\n  parity:\n    min_top1_agreement: 2\n", "export.parity.min_top1_agreement: must be <= 1"),
        ("teacher: {arch: [\n", "line 2: not valid YAML"),
        ("- 1\n", "the top level must be a mapping"),
        ("bogus: 1\n", "bogus: unknown key; known keys: baseline, benchmark, cache_dir"),
    ],
)
def test_errors_are_one_line_naming_the_key(tmp_path, text, expected):
    err = str(error_of(tmp_path, text))
    assert expected in err, err
    assert err.endswith("(pipeline.yaml)")
    assert "\n" not in err


def test_several_errors_are_counted():
    with pytest.raises(ConfigError) as info:
        parse_config({"distill": {"factor": 0, "train": {"epochs": -1}}}, "x.yaml")
    assert "(and 1 more problem)" in str(info.value)


def test_overrides_and_relative_paths(tmp_path):
    path = tmp_path / "sub" / "p.yaml"
    path.parent.mkdir()
    path.write_text("cache_dir: cache\n")
    cfg = load_config(path, ["distill.train.epochs=7", "benchmark.batch_sizes=[1, 2]"])
    assert cfg.config.distill.train.epochs == 7
    assert cfg.config.benchmark.batch_sizes == [1, 2]
    assert cfg.cache_dir == path.parent.resolve() / "cache"
    with pytest.raises(ConfigError, match=r"distill.train.epochs: must be > 0"):
        load_config(path, ["distill.train.epochs=0"])


def test_missing_file():
    with pytest.raises(ConfigError, match=r"config file not found"):
        load_config("/nonexistent/pipeline.yaml")
