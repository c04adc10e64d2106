"""The CLI on bad input that is caught before any stage runs: one line on stderr, exit 2, the key or file named,
and nothing written (no cache folder, no output folder)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kdpipe.cli import main
from tests.conftest import TINY


def run_cli(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(TINY))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def assert_one_line_exit_2(code: int, err: str, *names: str) -> None:
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("kdpipe: error: "), err
    for name in names:
        assert name in err, err


def assert_nothing_written(project: Path) -> None:
    assert not (project / ".kdpipe").exists()
    assert not (project / "kdpipe-out").exists()


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("data: {dataset: synthetic}\ndata: {dataset: synthetic}\n", ("data: duplicated key", "lines 1 and 2")),
        (b"distill: {student: r\xe9snet8}\n", ("not UTF-8", "pipeline.yaml")),
        ("data: {dataset: fashion_mnist, root: nowhere}\n", ("data.root", "nowhere does not exist")),
        ("cache_dir: afile\n", ("cache_dir", "is a file")),
        ("output_dir: afile/out\n", ("output_dir", "cannot be created")),
    ],
)
def test_bad_config_before_any_work(project, capsys, text, names):
    (project / "afile").write_text("not a folder")
    config = project / "pipeline.yaml"
    config.write_bytes(text if isinstance(text, bytes) else text.encode())
    code, err = run_cli(capsys, "run", "-c", str(config))
    assert_one_line_exit_2(code, err, *names)
    assert_nothing_written(project)


@pytest.mark.parametrize(
    ("override", "names"),
    [
        ("distill.train.epochs=[1,", ("--set distill.train.epochs", "not valid YAML")),
        ("distill.train=3", ("distill.train", "mapping")),
        ("nokey", ("--set 'nokey'",)),
        ("cache_dir=afile", ("cache_dir", "is a file")),
    ],
)
@pytest.mark.parametrize("command", ["run", "status"])
def test_bad_set_values(project, capsys, override, names, command):
    (project / "afile").write_text("not a folder")
    code, err = run_cli(capsys, command, "-c", "pipeline.yaml", "--set", override)
    assert_one_line_exit_2(code, err, *names)
    assert_nothing_written(project)


def test_clean_with_cache_dir_that_is_a_file(project, capsys):
    (project / "afile").write_text("x")
    code, err = run_cli(capsys, "clean", "-c", "pipeline.yaml", "--set", "cache_dir=afile")
    assert_one_line_exit_2(code, err, "cache_dir")
    assert (project / "afile").read_text() == "x"


def test_library_warnings_stay_out_of_one_line_errors(project, capsys, monkeypatch):
    import warnings

    from kdpipe.errors import UsageError
    from kdpipe.stages import STAGES

    def noisy(self, ctx):
        warnings.warn_explicit(
            "torch.jit.script is deprecated", DeprecationWarning, "torch/jit/_script.py", 1, "torch.jit"
        )
        warnings.warn_explicit("Detected pickle protocol 4", UserWarning, "torch/_unpickler.py", 1, "torch._unpickler")
        raise UsageError("teacher.path: bad.pt is damaged")

    monkeypatch.setattr(STAGES.get("teacher"), "run", noisy)
    with warnings.catch_warnings(record=True) as shown:  # what would reach the terminal
        warnings.simplefilter("always")
        code, err = run_cli(capsys, "run", "--until", "teacher")
    assert_one_line_exit_2(code, err, "teacher.path")
    assert [str(w.message) for w in shown] == []


def test_truncated_dataset_file_through_the_cli(project, capsys):
    from tests.unit.test_sources import fake_fashion

    folder = fake_fashion(project / "fm")
    images = folder / "t10k-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[:-20])
    (project / "pipeline.yaml").write_text(
        yaml.safe_dump({**TINY, "data": {"dataset": "fashion_mnist", "root": "fm", "download": False}})
    )
    code, err = run_cli(capsys, "run")
    assert_one_line_exit_2(code, err, str(images), "truncated")
    assert not [p for p in (project / ".kdpipe").glob("*/*") if not p.name.startswith(".")]  # no entry committed
    assert not (project / "kdpipe-out").exists()


@pytest.mark.parametrize(
    ("extra", "names"),
    [
        ({"benchmark": {"providers": ["NoSuchExecutionProvider"]}}, ("benchmark.providers",)),
        ({"gates": [{"metric": "top1", "model": "studnet", "min": 0.5}]}, ("gates", "studnet")),
        ({"teacher": {"feature_node": "nope"}}, ("teacher.feature_node", "'nope'")),
    ],
)
def test_problems_found_before_the_first_stage(project, capsys, monkeypatch, extra, names):
    from kdpipe.stages import STAGES
    from tests.conftest import deep_merge

    ran = []
    for name in STAGES:
        monkeypatch.setattr(STAGES.get(name), "run", lambda self, ctx, _n=name: ran.append(_n))
    (project / "pipeline.yaml").write_text(yaml.safe_dump(deep_merge(TINY, extra)))
    code, err = run_cli(capsys, "run")
    assert_one_line_exit_2(code, err, *names)
    assert ran == []
    assert not (project / "kdpipe-out").exists()


def test_command_line_gate_naming_an_unknown_model(project, capsys):
    code, err = run_cli(capsys, "run", "--gate", "techer.top1 >= 0.5")
    assert_one_line_exit_2(code, err, "techer")


def _png(path: Path) -> None:
    import numpy as np
    from PIL import Image

    Image.fromarray(np.full((16, 16, 3), 90, dtype=np.uint8)).save(path)


PNG_DAMAGE = {
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]),
    "zero bytes": lambda p: p.write_bytes(b""),
    "not an image": lambda p: p.write_bytes(b"<html>404 not found</html>\n"),
    "damaged pixels": lambda p: p.write_bytes(p.read_bytes()[:40] + b"\x00" * 20 + p.read_bytes()[60:]),
}


@pytest.mark.parametrize("in_memory", [True, False])
@pytest.mark.parametrize("damage", sorted(PNG_DAMAGE))
def test_corrupt_png_in_an_image_folder(project, capsys, damage, in_memory):
    from tests.image_data import make_imagefolder

    root = make_imagefolder(project / "photos", train=4, test=2, size=16)
    bad = root / "train" / sorted(p.name for p in (root / "train").iterdir())[0] / "x.png"
    _png(bad)
    PNG_DAMAGE[damage](bad)
    data = {"dataset": "imagefolder", "root": str(root), "image_size": 16, "in_memory": in_memory, "workers": 1}
    (project / "pipeline.yaml").write_text(yaml.safe_dump({**TINY, "data": data}))
    code, err = run_cli(capsys, "run", "--until", "teacher")
    assert_one_line_exit_2(code, err, str(bad))
    assert not [p for p in (project / ".kdpipe").glob("*/*") if not p.name.startswith(".")]  # no entry committed


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("output_dir=.", "holds the config's own folder"),
        ("output_dir=..", "holds the config's own folder"),
        ("output_dir=.kdpipe", "overlaps cache_dir"),
        ("output_dir=.kdpipe/out", "overlaps cache_dir"),
        ("cache_dir=kdpipe-out/cache", "overlaps cache_dir"),
    ],
)
@pytest.mark.parametrize("command", ["run", "clean"])
def test_output_dir_that_clean_would_wipe_with_the_project(project, capsys, override, expected, command):
    code, err = run_cli(capsys, command, "--set", override)
    assert_one_line_exit_2(code, err, "output_dir", expected)
    assert (project / "pipeline.yaml").is_file()
