"""Session tuning: the candidate grid, the noise-aware choice and the file the edge runner reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdpipe.edge import runner, session_tuning
from kdpipe.edge.session_tuning import candidates, thread_options, tune_session, write_session


def test_candidate_grid() -> None:
    grid = candidates([1, 2])
    assert len(grid) == 2 * 3 * 2
    assert {"intra_op_num_threads": 2, "inter_op_num_threads": 2, "graph_optimization_level": "ORT_ENABLE_BASIC",
            "execution_mode": "ORT_PARALLEL"} in grid  # fmt: skip
    assert all(c["inter_op_num_threads"] == 1 for c in grid if c["execution_mode"] == "ORT_SEQUENTIAL")
    assert thread_options(2) == [1, 2] and thread_options(6) == [1, 2, 4, 6] and thread_options(1) == [1]


def fake_runner(times: dict[tuple[str, str, int], float]):
    """run_isolated stand-in: each candidate's rounds are its time ± a little noise."""

    def run(cell: dict) -> list[dict]:
        s = cell["session"]
        base = times.get((s["graph_optimization_level"], s["execution_mode"], s["intra_op_num_threads"]), 1.0)
        rounds = [base * (1 + 0.01 * ((i * 7) % 5 - 2)) for i in range(10)]
        return [{"p50_ms": base, "p90_ms": base * 1.1, "round_p50_ms": rounds}]

    return run


def test_a_clear_win_is_taken_and_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        session_tuning, "run_isolated", fake_runner({("ORT_ENABLE_EXTENDED", "ORT_SEQUENTIAL", 2): 0.5})
    )
    tuned = tune_session(tmp_path / "m.onnx", [1, 8, 8], threads=[1, 2])
    assert tuned["tuned"] and tuned["session"]["graph_optimization_level"] == "ORT_ENABLE_EXTENDED"
    assert tuned["session"]["intra_op_num_threads"] == 2 and tuned["p50_ratio"][2] < 1
    (tmp_path / "m.onnx").write_bytes(b"")
    path = write_session(tmp_path / "m.onnx", tuned)
    assert path.name == "m.session.json" and json.loads(path.read_text())["p50_ms"] == 0.5
    assert runner.load_session(str(tmp_path / "m.onnx"))["intra_op_num_threads"] == 2  # what the runner applies


def test_a_win_within_noise_keeps_the_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(session_tuning, "run_isolated", fake_runner({("ORT_ENABLE_BASIC", "ORT_PARALLEL", 1): 0.995}))
    tuned = tune_session(tmp_path / "m.onnx", [1, 8, 8], threads=[1])
    assert not tuned["tuned"]
    assert tuned["session"] == {"intra_op_num_threads": 1, "inter_op_num_threads": 1,
                                "graph_optimization_level": "ORT_ENABLE_ALL", "execution_mode": "ORT_SEQUENTIAL",
                                "provider": "CPUExecutionProvider"}  # fmt: skip
