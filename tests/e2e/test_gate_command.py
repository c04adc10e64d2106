"""`kdpipe gate` on an existing report: reads only unless --write; --junit and --md files; figures without noise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from kdpipe.cli import main
from tests.conftest import TINY

TOP1 = float.fromhex("0x1.cb0f280000000p-1")  # 0.8966000080108643: a float32 accuracy widened to float64


def report() -> dict:
    model = {"arch": "tiny_cnn", "parameters": 1234, "accuracy": {"samples": 64, "top1": TOP1, "top5": 1.0}}
    return {"schema_version": 1, "created": "2026-11-25T10:00:00Z", "models": {"student": model}, "gates": []}


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(TINY))
    out = tmp_path / "kdpipe-out"
    out.mkdir()
    (out / "report.json").write_text(json.dumps(report(), indent=2))
    (out / "report.md").write_text("# the run's own summary\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def files(project: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted((project / "kdpipe-out").iterdir())}


def test_gate_reads_only(project, capsys):
    before = files(project)
    assert main(["gate", "--gate", "student.top1 >= 0.95"]) == 1
    out = capsys.readouterr().out
    assert "FAILED student.top1 >= 0.95: measured 0.8966 misses >= 0.95" in out
    assert "0.896600008" not in out
    assert main(["gate", "--gate", "student.top1 >= 0.5"]) == 0
    assert files(project) == before  # neither report.json nor report.md rewritten


def test_write_saves_the_verdicts(project):
    assert main(["gate", "--gate", "student.top1 >= 0.5", "--write"]) == 0
    saved = json.loads((project / "kdpipe-out" / "report.json").read_text())
    assert [g["name"] for g in saved["gates"]] == ["student.top1 >= 0.5"] and saved["gates"][0]["passed"]
    assert "gates passed" in (project / "kdpipe-out" / "report.md").read_text()


def test_write_into_a_given_report(project):
    other = project / "elsewhere.json"
    other.write_text(json.dumps(report()))
    assert main(["gate", "--report", str(other), "--gate", "student.top1 >= 0.99", "--write"]) == 1
    assert json.loads(other.read_text())["gates"][0]["passed"] is False


def test_junit_and_markdown_files_even_when_a_gate_fails(project, capsys):
    before = files(project)
    code = main(["gate", "--gate", "student.top1 >= 0.95", "--junit", "ci/gates.xml", "--md", "ci/gates.md"])
    assert code == 1
    xml = (project / "ci" / "gates.xml").read_text()
    assert 'failures="1"' in xml and "measured 0.8966 vs threshold &gt;= 0.95" in xml and "0.896600008" not in xml
    assert "1 of 1 gates failed" in (project / "ci" / "gates.md").read_text()
    assert files(project) == before


def test_junit_validates_against_the_schema(project):
    xmlschema = pytest.importorskip("xmlschema")
    assert main(["gate", "--gate", "student.top1 >= 0.5", "--junit", "g.xml"]) == 0
    schema = xmlschema.XMLSchema(str(Path(__file__).parents[1] / "fixtures" / "junit.xsd"))
    schema.validate(str(project / "g.xml"))


@pytest.mark.parametrize("gate", ["student.nope >= 1", "teacher.top1 >= 0.5", "student.p90_ms@1 <= 2"])
def test_bad_input_writes_nothing(project, capsys, gate):
    before = files(project)
    code = main(["gate", "--gate", gate, "--junit", "g.xml", "--md", "g.md", "--write"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert not (project / "g.xml").exists() and not (project / "g.md").exists()
    assert files(project) == before


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("[1, 2]", "a JSON list, not a kdpipe report"),
        ('"report"', "a JSON str"),
        ("{not json", "not a readable JSON report"),
        (b"\xff\xfe{}", "not a readable JSON report"),
        ('{"schema_version": 1, "models": []}', "`models` is not an object"),
        ('{"schema_version": 1, "models": {"student": 3}}', "`models.student` is not an object"),
        ('{"schema_version": 1, "models": {"student": {"accuracy": [0.9]}}}', "`models.student.accuracy`"),
        ('{"schema_version": 1, "gates": {"a": 1}}', "`gates` is not a list"),
        ('{"schema_version": 2}', "schema_version 2, expected 1"),
    ],
)
@pytest.mark.parametrize(
    "command", [["gate", "--report"], ["report", "--format", "junit", "--report"], ["gate", "--baseline"]]
)
def test_damaged_report_files(project, capsys, content, expected, command):
    bad = project / "bad.json"
    bad.write_bytes(content if isinstance(content, bytes) else content.encode())
    code = main([*command, str(bad)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert str(bad) in err and expected in err, err


def test_report_path_that_is_a_folder(project, capsys):
    assert main(["gate", "--report", str(project)]) == 2
    assert "is a directory" in capsys.readouterr().err  # click checks it first


@pytest.mark.parametrize(
    "args",
    [
        ["report", "--format", "md", "-o", "afile/r.md"],
        ["report", "--format", "html", "-o", "kdpipe-out"],
        ["gate", "--junit", "afile/g.xml"],
        ["gate", "--md", "afile/deeper/g.md"],
    ],
)
def test_output_paths_that_cannot_be_written(project, capsys, args):
    (project / "afile").write_text("a file, not a folder")
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("kdpipe: error: "), err
    assert "afile" in err or "kdpipe-out" in err


def _edited(change) -> str:
    data = report()
    change(data["models"]["student"])
    return json.dumps(data)


@pytest.mark.parametrize(
    "args",
    [
        ["gate", "--report", "edited.json", "--gate", "student.top1 >= 0.5"],
        ["gate", "--baseline", "edited.json"],
        ["report", "--format", "md", "--report", "edited.json"],
        ["report", "--format", "junit", "--report", "edited.json"],
        ["report", "--format", "html", "--report", "edited.json"],
    ],
)
@pytest.mark.parametrize(
    "change",
    [
        lambda m: m["accuracy"].update(top1="0.9"),
        lambda m: m["accuracy"].update(top1=None),
        lambda m: m.pop("accuracy"),
        lambda m: m.update(latency={"batch_1": {"p50_ms": "fast"}}),
    ],
)
def test_edited_reports_are_one_line(project, capsys, args, change):
    (project / "edited.json").write_text(_edited(change))
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code in (0, 2), err  # what a renderer can show without the figure is fine; a crash is not
    if code == 2:
        assert len(err.splitlines()) == 1 and err.startswith("kdpipe: error: "), err


def _artifact(tmp_path: Path, monkeypatch, gates: list[str]) -> Path:
    """An empty folder holding only a report.json (a CI artifact downloaded elsewhere), judged by ``gates``."""
    from kdpipe.reporting.gates import evaluate, parse_gate

    data = report()
    data["gates"] = evaluate(data, [parse_gate(g) for g in gates])
    baseline = {"name": "student.top1 vs baseline", "model": "student", "metric": "top1_drop_vs_baseline"}
    data["gates"].append({**baseline, "batch_size": None, "threshold": 0.005, "op": "<=", "measured": 0, "passed": 1})
    folder = tmp_path / "artifact"
    folder.mkdir()
    (folder / "report.json").write_text(json.dumps(data))
    monkeypatch.chdir(folder)
    return folder


@pytest.mark.parametrize(("fmt", "expected"), [("md", "tiny_cnn"), ("json", '"schema_version": 1'),
                                               ("junit", "<testsuite"), ("html", "<html")])  # fmt: skip
def test_report_renders_a_report_with_no_config_here(tmp_path, monkeypatch, capsys, fmt, expected):
    folder = _artifact(tmp_path, monkeypatch, ["student.top1 >= 0.5"])
    assert main(["report", "--report", "report.json", "--format", fmt]) == 0, capsys.readouterr().err
    assert expected in capsys.readouterr().out
    assert sorted(p.name for p in folder.iterdir()) == ["report.json"]  # no cache, no output folder


def test_gate_judges_the_recorded_gates_with_no_config_here(tmp_path, monkeypatch, capsys):
    _artifact(tmp_path, monkeypatch, ["student.top1 >= 0.5", "student.parameters <= 2000"])
    assert main(["gate", "--report", "report.json"]) == 0
    captured = capsys.readouterr()
    assert "judging the 2 gate(s) recorded in report.json" in captured.err
    assert "student.top1 >= 0.5" in captured.out and "student.parameters <= 2000" in captured.out
    assert "vs baseline" not in captured.out  # a baseline comparison needs the baseline report
    assert "2 passed, 0 failed" in captured.out


def test_a_failing_recorded_gate_still_fails(tmp_path, monkeypatch, capsys):
    folder = _artifact(tmp_path, monkeypatch, ["student.top1 >= 0.95"])
    assert main(["gate", "--report", "report.json", "--junit", "gates.xml", "--write"]) == 1
    assert "FAILED student.top1 >= 0.95: measured 0.8966 misses >= 0.95" in capsys.readouterr().out
    assert 'failures="1"' in (folder / "gates.xml").read_text()
    assert [g["name"] for g in json.loads((folder / "report.json").read_text())["gates"]] == ["student.top1 >= 0.95"]


def test_gate_expressions_replace_the_recorded_gates_with_no_config_here(tmp_path, monkeypatch, capsys):
    _artifact(tmp_path, monkeypatch, ["student.top1 >= 0.95"])  # recorded, failing: not judged now
    assert main(["gate", "--report", "report.json", "--gate", "student.top1 >= 0.8"]) == 0
    out = capsys.readouterr().out
    assert "student.top1 >= 0.8" in out and "0.95" not in out


def test_no_config_and_no_recorded_gates_says_what_to_pass(tmp_path, monkeypatch, capsys):
    _artifact(tmp_path, monkeypatch, [])
    (Path("report.json")).write_text(json.dumps(report()))  # no gates at all
    assert main(["gate", "--report", "report.json"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no gates to judge" in err and "--gate 'student.top1 >= 0.9'" in err, err


@pytest.mark.parametrize("command", [["report"], ["gate", "--gate", "student.top1 >= 0.5"]])
def test_the_last_report_needs_its_config(tmp_path, monkeypatch, capsys, command):
    _artifact(tmp_path, monkeypatch, [])
    assert main(command) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "config file not found: pipeline.yaml" in err and "--report FILE" in err
