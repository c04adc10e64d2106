"""The CI examples are valid YAML and keep the contract: run the gates, always publish the report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "ci"


def load(name: str) -> dict[str, Any]:
    data = yaml.safe_load((EXAMPLES / name).read_text())
    assert isinstance(data, dict)
    return data


def script_lines(value: Any) -> str:
    return "\n".join(value) if isinstance(value, list) else str(value or "")


@pytest.fixture(scope="module")
def github() -> dict[str, Any]:
    return load("github-actions.yml")


@pytest.fixture(scope="module")
def steps(github: dict[str, Any]) -> list[dict[str, Any]]:
    return [step for job in github["jobs"].values() for step in job["steps"]]


def test_github_has_triggers_and_jobs(github: dict[str, Any]) -> None:
    # YAML 1.1 reads the bare key `on` as the boolean True; GitHub reads it as the string.
    assert "on" in github or True in github
    triggers = github.get("on", github.get(True))
    assert "pull_request" in triggers and "push" in triggers
    assert github["jobs"]


def test_github_runs_the_pipeline(steps: list[dict[str, Any]]) -> None:
    run = [s for s in steps if "kdpipe run" in s.get("run", "")]
    assert run, "no step runs `kdpipe run`"
    assert "--baseline baseline/report.json" in run[0]["run"]
    assert "if [" in run[0]["run"]  # without a baseline on the first run
    assert "continue-on-error" not in run[0]  # a gate failure must fail the job


@pytest.mark.parametrize("fmt", ["html", "junit"])
def test_github_report_steps_always_run(steps: list[dict[str, Any]], fmt: str) -> None:
    found = [s for s in steps if f"kdpipe report --format {fmt}" in s.get("run", "")]
    assert found, f"no step runs `kdpipe report --format {fmt}`"
    assert all(s.get("if") == "always()" for s in found)


def test_github_uploads_and_publishes(steps: list[dict[str, Any]]) -> None:
    upload = [s for s in steps if s.get("uses", "").startswith("actions/upload-artifact")]
    assert upload and upload[0].get("if") == "always()"
    assert upload[0]["with"]["name"] == "kdpipe-report"
    assert "kdpipe-out/report.json" in upload[0]["with"]["path"]
    assert "kdpipe-out/report.html" in upload[0]["with"]["path"]
    publish = [s for s in steps if "junit" in s.get("uses", "") or "test-reporter" in s.get("uses", "")]
    assert publish and publish[0].get("if") == "always()"
    baseline = [s for s in steps if "download-artifact" in s.get("uses", "")]
    assert baseline and baseline[0]["with"]["name"] == "kdpipe-report"


def test_github_caches_kdpipe_folder(steps: list[dict[str, Any]]) -> None:
    caches = [s for s in steps if s.get("uses", "").startswith("actions/cache")]
    assert any(s["with"]["path"] == ".kdpipe" and "pipeline.yaml" in s["with"]["key"] for s in caches)


def test_gitlab_job_runs_gates_and_keeps_reports() -> None:
    data = load("gitlab-ci.yml")
    jobs = [v for v in data.values() if isinstance(v, dict) and "kdpipe run" in script_lines(v.get("script"))]
    assert jobs, "no job whose script runs `kdpipe run`"
    job = jobs[0]
    assert "allow_failure" not in job  # a gate failure must fail the pipeline
    artifacts = job["artifacts"]
    assert artifacts["when"] == "always"
    assert artifacts["reports"]["junit"] == "kdpipe-out/junit.xml"
    assert "kdpipe-out/report.json" in artifacts["paths"]
    rendered = script_lines(job.get("after_script")) + script_lines(job.get("script"))
    assert "kdpipe report --format junit -o kdpipe-out/junit.xml" in rendered
    assert "kdpipe report --format html" in rendered
    assert any(".kdpipe/" in c.get("paths", []) for c in job["cache"])
