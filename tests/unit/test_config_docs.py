"""`kdpipe config`: the generated reference and JSON Schema are up to date and right; --show resolves a config.

The JSON Schema (docs/kdpipe.schema.json) is what editors check pipeline.yaml with: every config in the repository
must pass it, and it must refuse what kdpipe refuses (unknown keys) and take what kdpipe takes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from kdpipe import configdoc
from kdpipe.cli import main
from kdpipe.config import PipelineConfig, load_config, parse_config
from kdpipe.yamlfile import load_file

REPO = Path(__file__).resolve().parents[2]
REPO_CONFIGS = [REPO / "pipeline.yaml", *sorted((REPO / "configs").glob("*.yaml"))]


def _schema() -> dict:
    return json.loads((REPO / configdoc.SCHEMA_FILE).read_text())


def _stale(file: str, command: str) -> str:
    return f"{file} is out of date with pipeline/config.py; regenerate it from the repository root with: {command}"


def test_reference_is_up_to_date() -> None:
    if (REPO / configdoc.REFERENCE_FILE).read_text() != configdoc.reference_markdown():
        pytest.fail(_stale(configdoc.REFERENCE_FILE, configdoc.REFERENCE_COMMAND), pytrace=False)


def test_schema_file_is_up_to_date() -> None:
    if (REPO / configdoc.SCHEMA_FILE).read_text() != configdoc.schema_text():
        pytest.fail(_stale(configdoc.SCHEMA_FILE, configdoc.SCHEMA_COMMAND), pytrace=False)


def test_reference_lists_every_key_with_a_description() -> None:
    text = configdoc.reference_markdown()
    for path, model, _holder in configdoc._sections(PipelineConfig):
        for name, field in model.model_fields.items():
            key = f"{path}.{field.alias or name}" if path else field.alias or name
            assert field.description, f"{key} ({model.__name__}.{name}) has no description: add Field(description=...)"
            assert f"`{key}`" in text, f"{key} is missing from the reference"


def test_schema_output_is_a_valid_json_schema(capsys) -> None:
    assert main(["config", "--schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["$schema"] == configdoc.DIALECT
    jsonschema.validators.validator_for(schema).check_schema(schema)
    assert schema["additionalProperties"] is False
    assert all(d.get("additionalProperties") is False for d in schema["$defs"].values() if "properties" in d)


@pytest.mark.parametrize("path", REPO_CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_repo_configs_validate_against_the_committed_schema(path: Path) -> None:
    errors = [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
        for e in jsonschema.Draft202012Validator(_schema()).iter_errors(load_file(path))
    ]
    assert not errors, f"{path.name}: {errors}"
    modeline = path.read_text().splitlines()[0]
    assert modeline.startswith("# yaml-language-server: $schema="), f"{path.name}: first line names no schema"
    target = (path.parent / modeline.split("$schema=", 1)[1].strip()).resolve()
    assert target == (REPO / configdoc.SCHEMA_FILE).resolve(), f"{path.name}: schema line points to {target}"


@pytest.mark.parametrize(
    "data, problem",
    [
        ({"distill": {"train": {"epocs": 3}}}, "'epocs' was unexpected"),
        ({"distil": {}}, "'distil' was unexpected"),
        ({"gates": [{"metric": "top1", "min": 0.9, "treshold": 1}]}, "'treshold' was unexpected"),
        ({"distill": {"method": "simkdd"}}, "is not one of"),
        ({"distill": {"train": {"epochs": True}}}, "is not of type 'integer'"),
    ],
)
def test_schema_refuses_what_kdpipe_refuses(data: dict, problem: str) -> None:
    messages = [e.message for e in jsonschema.Draft202012Validator(_schema()).iter_errors(data)]
    assert any(problem in m for m in messages), messages


@pytest.mark.parametrize(
    "data",
    [
        {"benchmark": {"intra_op_threads": 2}},  # one count for a list of one
        {"validate": {"batch_size": 64}},  # the alias, not the attribute name
        {"teacher": {"path": "shipped:fashion_mnist_wrn16_2"}},
        {"teacher": {"preprocessing": "config.json"}},
        {"data": {"normalize": {"mean": [0.5], "std": [0.25]}, "imagenet": {"scale": [0.2, 1]}}},
    ],
)
def test_schema_takes_what_kdpipe_takes(data: dict) -> None:
    parse_config(data)
    assert not [e.message for e in jsonschema.Draft202012Validator(_schema()).iter_errors(data)]


def test_show_fills_defaults_and_applies_set(tmp_path, capsys) -> None:
    config = tmp_path / "pipeline.yaml"
    config.write_text("distill:\n  student: resnet14\n")
    code = main(["config", "--show", "-c", str(config), "--set", "distill.train.epochs=7", "--set", "gates=[]"])
    assert code == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["distill"]["train"]["epochs"] == 7 and shown["distill"]["student"] == "resnet14"
    assert shown["benchmark"]["rounds"] == 10 and shown["validate"]["batch_size"] == 256  # defaults filled
    resolved = load_config(config, ["distill.train.epochs=7"]).config
    assert parse_config(shown) == resolved  # the YAML it prints loads back into the same config


def test_show_writes_a_file(tmp_path) -> None:
    out = tmp_path / "resolved.yaml"
    assert main(["config", "-c", str(REPO / "pipeline.yaml"), "-o", str(out)]) == 0  # --show is the default
    assert parse_config(yaml.safe_load(out.read_text())) == load_config(REPO / "pipeline.yaml").config


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--show", "--set", "distill.train.epocs=3"], "distill.train.epocs: unknown key; did you mean 'epochs'?"),
        (["--show", "-c", "missing.yaml"], "missing.yaml"),
        (["--schema", "--set", "distill.train.epochs=3"], "--set go with --show"),
        (["--schema", "--reference"], "give one of --show, --schema or --reference"),
    ],
)
def test_errors_are_one_line_exit_2(tmp_path, monkeypatch, capsys, argv: list[str], message: str) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pipeline.yaml").write_text("distill: {student: resnet8}\n")
    assert main(["config", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("kdpipe: error: ") and err.count("\n") == 1, err


def test_config_command_imports_no_torch() -> None:
    code = (
        "import sys, io, contextlib\n"
        "from kdpipe.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    codes = [main(['config', a, *x]) for a, x in (('--show', ['-c', sys.argv[1]]), ('--schema', []),"
        " ('--reference', []))]\n"
        "print(codes, sorted(m for m in ('torch', 'torchvision', 'onnx', 'onnxruntime', 'timm') if m in sys.modules))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(REPO / "pipeline.yaml")], capture_output=True, text=True, cwd="/"
    )
    assert proc.stdout.strip() == "[0, 0, 0] []", proc.stdout + proc.stderr
