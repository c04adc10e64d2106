"""kdpipe's JUnit output validates against the Apache Ant JUnit schema and says why a gate failed."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from kdpipe.reporting.junit import render_junit, write_junit

xmlschema = pytest.importorskip(
    "xmlschema", reason="xmlschema is needed to validate the JUnit output against the Ant schema"
)

XSD = Path(__file__).resolve().parents[1] / "fixtures" / "junit.xsd"


@pytest.fixture(scope="module")
def schema():
    return xmlschema.XMLSchema(str(XSD))


def gate(name: str, metric: str, threshold: float, op: str, measured: float, model: str = "student") -> dict[str, Any]:
    passed = measured >= threshold if op == ">=" else measured <= threshold
    return {
        "name": name,
        "model": model,
        "metric": metric,
        "batch_size": None,
        "threshold": threshold,
        "op": op,
        "measured": measured,
        "passed": passed,
        "detail": f"measured {measured:.6g} {'meets' if passed else 'misses'} {op} {threshold:g}",
    }


def make_report(gates: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "schema_version": 1,
        "kdpipe_version": "0.1.0",
        "created": "2026-11-24T07:00:00Z",
        "dataset": {"name": "fashion-mnist", "classes": ["t-shirt", "trouser"]},
        "stages": {
            "teacher": {"key": "a" * 64, "cached": True, "seconds": 0.0},
            "distill": {"key": "b" * 64, "cached": False, "seconds": 12.5},
        },
        "gates": gates,
    }


MIXED = [
    gate("student.file_bytes <= 2e+06", "file_bytes", 2e6, "<=", 1_234_567.0),
    gate("student.top1 >= 0.88", "top1", 0.88, ">=", 0.8755),
]


def suite_of(xml: str) -> ET.Element:
    root = ET.fromstring(xml)
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    assert suite is not None
    return suite


def test_passing_and_failing_gates_validate(schema) -> None:
    xml = render_junit(make_report(MIXED))
    schema.validate(xml)
    suite = suite_of(xml)
    assert suite.get("name") == "kdpipe.gates"
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("2", "1", "0")
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == [g["name"] for g in MIXED]
    assert {c.get("classname") for c in cases} == {"kdpipe.gates.student"}
    assert cases[0].find("failure") is None


def test_failure_states_measured_and_threshold(schema) -> None:
    failure = suite_of(render_junit(make_report(MIXED))).find("testcase/failure")
    assert failure is not None
    assert failure.get("type") == "top1"
    assert "0.8755" in failure.get("message", "") and "0.88" in failure.get("message", "")
    assert failure.text == "student.top1 >= 0.88: measured 0.8755 vs threshold >= 0.88"


def test_suite_metadata(schema) -> None:
    suite = suite_of(render_junit(make_report(MIXED)))
    assert suite.get("timestamp") == "2026-11-24T07:00:00"  # the schema forbids a timezone suffix
    assert suite.get("hostname")
    props = {p.get("name"): p.get("value") for p in suite.findall("properties/property")}
    assert props["kdpipe_version"] == "0.1.0"
    assert props["dataset"] == "fashion-mnist"
    assert props["stages.teacher.key"] == "a" * 64 and props["stages.distill.key"] == "b" * 64


def test_no_gates_still_validates(schema) -> None:
    xml = render_junit(make_report([]))
    schema.validate(xml)
    suite = suite_of(xml)
    assert (suite.get("tests"), suite.get("failures")) == ("0", "0")
    assert suite.findall("testcase") == []


def test_minimal_report_validates(schema) -> None:
    """No stages, no dataset, no creation time: still a valid document."""
    schema.validate(render_junit({"gates": []}))


def test_special_characters_are_escaped(schema) -> None:
    name = 'student.top1 <"odd" & gate> >= 0.99'
    bad = gate(name, "top1", 0.99, ">=", 0.5)
    bad["detail"] = 'measured 0.5 misses >= 0.99 <&"\x01>'
    xml = render_junit(make_report([bad]))
    schema.validate(xml)
    assert "&lt;" in xml and "&amp;" in xml and "&quot;" in xml
    case = suite_of(xml).find("testcase")
    assert case is not None and case.get("name") == name
    failure = case.find("failure")
    assert failure is not None and failure.text is not None and failure.text.startswith(name)


def test_write_junit_is_atomic(tmp_path: Path, schema) -> None:
    target = tmp_path / "out" / "junit.xml"
    assert write_junit(make_report(MIXED), target) == target
    schema.validate(str(target))
    assert sorted(p.name for p in target.parent.iterdir()) == ["junit.xml"]
