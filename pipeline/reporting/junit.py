"""JUnit XML of a report's gates, for CI servers that show test results (GitLab, Jenkins, GitHub check actions).

The output validates against the Apache Ant JUnit schema (``tests/fixtures/junit.xsd``), which is stricter
than what most tools write: ``testsuite`` must carry name, timestamp (without a timezone), hostname, tests,
failures, errors and time, and must have ``properties``, ``system-out`` and ``system-err`` children, in that
order around the test cases. The schema allows a ``testsuites`` root, but then each suite also needs
``package`` and ``id`` and the root itself may carry no attributes at all (no totals), so kdpipe writes that
form with one suite.
"""

from __future__ import annotations

import re
import socket
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kdpipe.fileio import atomic_write_text
from kdpipe.version import __version__

SUITE_NAME = "kdpipe.gates"
SUITE_PACKAGE = "kdpipe"
# Characters XML 1.0 cannot carry at all, not even escaped; ElementTree would write them through as they are.
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _text(value: Any) -> str:
    return _NOT_XML.sub("\ufffd", str(value))


def _number(value: Any) -> str:
    """A figure as people read it: no float noise, but no digits lost on byte counts either."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int) or (value.is_integer() and abs(value) < 1e15):
        return str(int(value))  # byte and parameter counts keep every digit
    return format(value, ".6g")  # 0.8966, not the float32 noise of 0.896600008


def _timestamp(created: Any) -> str:
    """``2026-11-24T07:00:00Z`` → ``2026-11-24T07:00:00``: the schema forbids a timezone, so UTC is implied."""
    when: datetime | None = None
    if isinstance(created, str) and created:
        text = created[:-1] + "+00:00" if created.endswith(("Z", "z")) else created
        try:
            when = datetime.fromisoformat(text)
        except ValueError:
            when = None
    if when is None:
        when = datetime.now(timezone.utc)
    if when.tzinfo is not None:
        when = when.astimezone(timezone.utc)
    return when.strftime("%Y-%m-%dT%H:%M:%S")


def _dataset_name(dataset: Any) -> str | None:
    if isinstance(dataset, dict):
        dataset = dataset.get("name")
    return None if dataset in (None, "") else str(dataset)


def _properties(report: dict[str, Any]) -> list[tuple[str, str]]:
    props = [("kdpipe_version", str(report.get("kdpipe_version") or __version__))]
    dataset = _dataset_name(report.get("dataset"))
    if dataset is not None:
        props.append(("dataset", dataset))
    for stage, info in (report.get("stages") or {}).items():
        if isinstance(info, dict) and info.get("key"):
            props.append((f"stages.{stage}.key", str(info["key"])))
    return props


def render_junit(report: dict[str, Any]) -> str:
    """One ``testsuite`` (``kdpipe.gates``) with a ``testcase`` per gate; a failed gate carries a ``failure``."""
    gates = list(report.get("gates") or [])
    failed = [g for g in gates if not g.get("passed")]
    root = ET.Element("testsuites")
    suite = ET.SubElement(
        root,
        "testsuite",
        {
            "name": SUITE_NAME,
            "package": SUITE_PACKAGE,
            "id": "0",
            "timestamp": _timestamp(report.get("created")),
            "hostname": _text(socket.gethostname().strip() or "localhost"),
            "tests": str(len(gates)),
            "failures": str(len(failed)),
            "errors": "0",
            "skipped": "0",
            "time": "0",
        },
    )
    properties = ET.SubElement(suite, "properties")
    for name, value in _properties(report):
        ET.SubElement(properties, "property", {"name": _text(name), "value": _text(value)})
    for g in gates:
        name = str(g.get("name") or f"{g.get('model')}.{g.get('metric')}")
        case = ET.SubElement(
            suite,
            "testcase",
            {"name": _text(name), "classname": _text(f"kdpipe.gates.{g.get('model') or 'unknown'}"), "time": "0"},
        )
        if g.get("passed"):
            continue
        measured, threshold = _number(g.get("measured")), _number(g.get("threshold"))
        summary = f"{name}: measured {measured} vs threshold {g.get('op', '')} {threshold}"
        failure = ET.SubElement(
            case, "failure", {"message": _text(g.get("detail") or summary), "type": _text(g.get("metric") or "gate")}
        )
        failure.text = _text(summary)
    ET.SubElement(suite, "system-out").text = _text(f"{len(gates) - len(failed)} passed, {len(failed)} failed\n")
    ET.SubElement(suite, "system-err")
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def write_junit(report: dict[str, Any], path: Path) -> Path:
    """Write :func:`render_junit` to ``path`` atomically (a reader never sees half a file)."""
    return atomic_write_text(Path(path), render_junit(report))
