"""The measuring scripts in benchmarks/: each imports, and the cached-run helper they share works end to end."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import yaml

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
SCRIPTS = sorted(p.stem for p in BENCHMARKS.glob("*.py"))


@pytest.fixture
def benchmarks_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # as `python benchmarks/NAME.py` puts it there


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_imports_without_running(name, benchmarks_on_path):
    module = importlib.import_module(name)
    assert module.__doc__, f"benchmarks/{name}.py says what it measures in its docstring"
    sys.modules.pop(name, None)


def test_rows_share_a_cache_in_the_work_folder_and_a_second_run_is_a_hit(write_config, tmp_path, benchmarks_on_path):
    from cached_runs import run_cached, work_copy

    config = write_config(
        {"distill": {"method": "kd", "compare": ["scratch"]}, "gates": [{"metric": "top1", "min": 0.99}]}
    )
    work = tmp_path / "work"
    row = work_copy(config, work)
    conf = yaml.safe_load(row.read_text())
    assert conf["distill"]["compare"] == [] and "gates" not in conf  # one method a row, a measurement
    assert conf["cache_dir"] == str(work / "cache") and conf["output_dir"] == str(work / "out")

    first = run_cached(row, {"distill.method": "scratch"}, until="distill")
    assert first.code == 0 and 0 <= first.metrics("distill")["best_val_top1"] <= 1
    again = run_cached(row, {"distill.method": "scratch"}, until="distill")
    assert again.metrics("distill") == first.metrics("distill")
    stages = json.loads((work / "cache" / "last_run.json").read_text())["stages"]
    assert stages["distill"]["cached"] is True


def test_a_failed_row_stops_the_script_with_the_runs_own_error(write_config, tmp_path, benchmarks_on_path):
    from cached_runs import run_cached, work_copy

    row = work_copy(write_config(), tmp_path / "work")
    with pytest.raises(SystemExit) as stop:
        run_cached(row, {"distill.method": "no_such_method"}, until="distill")
    assert "failed (exit 2)" in str(stop.value) and "no_such_method" in str(stop.value)


def test_the_real_data_row_sees_as_many_images_as_the_data_free_student(write_config, benchmarks_on_path):
    from datafree import real_epochs

    from kdpipe.config import load_config
    from kdpipe.preflight import training_split_images

    def config(epochs: int, steps: int) -> Path:
        datafree = {"steps_per_epoch": steps}
        return write_config({"distill": {"data": "synthetic", "datafree": datafree, "train": {"epochs": epochs}}})

    path = config(3, 40)
    cfg = load_config(path)
    split = training_split_images(cfg)
    drawn = 3 * 40 * cfg.config.distill.train.batch_size
    assert split and real_epochs(path) == max(1, round(drawn / split))
    assert real_epochs(config(1, 1)) == 1  # fewer images than the split holds: one whole epoch
    assert real_epochs(config(40, 400)) > real_epochs(config(4, 400))
