"""Strict YAML and config input: duplicated keys, bytes that are not UTF-8, --set values, data.root, and
folder settings that cannot be written. Every problem is one line, exit 2, naming the key or the file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kdpipe.config import load_config
from kdpipe.diskspace import check_writable_dir
from kdpipe.errors import ConfigError, UsageError
from kdpipe.ml.data import sources


def one_line_error(tmp_path: Path, text: str | bytes, overrides=()) -> str:
    path = tmp_path / "pipeline.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert "\n" not in message and info.value.exit_code == 2
    return message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("distill:\n  train:\n    epochs: 3\n    lr: 0.1\n    epochs: 5\n", "distill.train.epochs: duplicated key (lines 3 and 5)"),  # noqa: E501
        ("cache_dir: a\ncache_dir: b\n", "cache_dir: duplicated key (lines 1 and 2)"),
        ("distill: {student: resnet8, student: resnet20}\n", "distill.student: duplicated key (lines 1 and 1)"),
        ("gates:\n  - {metric: top1, min: 0.5, min: 0.6}\n", "gates[0].min: duplicated key"),
        ("teacher: {}\nteacher: {arch: resnet20}\n", "teacher: duplicated key (lines 1 and 2)"),
    ],
)  # fmt: skip
def test_duplicated_key_names_the_key_and_both_lines(tmp_path, text, expected):
    message = one_line_error(tmp_path, text)
    assert message.startswith(expected), message
    assert message.endswith("(pipeline.yaml)")


@pytest.mark.parametrize(
    "raw",
    [
        b"distill:\n  student: r\xe9snet8\n",  # latin-1
        b"\xff\xfed\x00i\x00s\x00",  # UTF-16
        b"\x89PNG\r\n\x1a\n\x00\x00",  # a binary file given by mistake
    ],
)
def test_not_utf8_is_one_line_naming_the_file(tmp_path, raw):
    message = one_line_error(tmp_path, raw)
    assert "not UTF-8" in message and "pipeline.yaml" in message


def test_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_bytes(b"\xef\xbb\xbfdistill: {student: resnet8}\n")
    assert load_config(path).config.distill.student == "resnet8"


def test_python_tags_and_syntax_errors_are_one_line(tmp_path):
    assert "not valid YAML" in one_line_error(tmp_path, "teacher: !!python/object/apply:os.system [echo hi]\n")
    assert "line 2" in one_line_error(tmp_path, "a: [\n")


def test_config_path_that_is_a_folder(tmp_path):
    with pytest.raises(ConfigError, match="is a folder, not a file"):
        load_config(tmp_path)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("distill.train.epochs=[1,", "--set distill.train.epochs"),
        ("distill.train.epochs={a: 1, a: 2}", "duplicated key"),
        ("epochs", "must look like key.path=value"),
        ("=3", "must look like key.path=value"),
        ("distill..epochs=3", "must look like key.path=value"),
        ("distill.student.name=x", "cannot set a key below distill.student, which is not a mapping"),
        ("distill.train.epochs=0", "distill.train.epochs: must be > 0"),
        ("distill.train.epochs=!!python/name:os.system", "not valid YAML"),
        ("distill.train.lr=.inf", "distill.train.lr: must be a finite number, got inf"),
        ("distill.kd.temperature=.nan", "distill.kd.temperature: must be a finite number"),
        ("distill.train.batch_size=true", "distill.train.batch_size: must be a number, got true"),
        ("teacher.train.lr=false", "teacher.train.lr: must be a number, got false"),
        ("distill.train.seed=-1", "distill.train.seed: must be >= 0"),
    ],
)
def test_set_values_get_the_same_one_line_errors(tmp_path, override, expected):
    message = one_line_error(tmp_path, "distill: {student: resnet8}\n", [override])
    assert expected in message, message


def test_set_on_an_empty_file_and_on_a_null_section(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("")
    assert load_config(path, ["distill.train.epochs=2"]).config.distill.train.epochs == 2
    path.write_text("distill:\n")
    assert load_config(path, ["distill.train.epochs=4"]).config.distill.train.epochs == 4


@pytest.fixture
def no_system_data(monkeypatch, tmp_path):
    monkeypatch.setattr(sources, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian")
    monkeypatch.setattr(sources, "default_download_root", lambda: tmp_path / "no-download")


def test_configured_root_that_does_not_exist_is_an_error_not_a_fallback(no_system_data, tmp_path, monkeypatch):
    from tests.unit.test_sources import fake_fashion

    monkeypatch.setenv("KDPIPE_DATA", str(fake_fashion(tmp_path / "env")))
    path = tmp_path / "p.yaml"
    for dataset in ("fashion_mnist", "cifar10", "imagefolder"):
        path.write_text(f"data: {{dataset: {dataset}, root: typo, download: true}}\n")
        with pytest.raises(ConfigError) as info:
            sources.dataset_fingerprint(load_config(path), None)  # type: ignore[arg-type]
        assert str(info.value) == f"data.root: {tmp_path / 'typo'} does not exist (p.yaml)"


def test_configured_root_without_the_files_does_not_look_elsewhere(no_system_data, tmp_path, monkeypatch):
    from tests.unit.test_sources import fake_fashion

    monkeypatch.setenv("KDPIPE_DATA", str(fake_fashion(tmp_path / "env")))
    (tmp_path / "empty").mkdir()
    path = tmp_path / "p.yaml"
    path.write_text("data: {dataset: fashion_mnist, root: empty, download: false}\n")
    with pytest.raises(ConfigError, match=r"data.root: .*empty does not hold the four Fashion-MNIST"):
        sources.locate_fashion_mnist(load_config(path))
    path.write_text("data: {dataset: fashion_mnist, download: false}\n")  # no root: the search order applies
    assert sources.locate_fashion_mnist(load_config(path))["t10k-images-idx3-ubyte"].parent == tmp_path / "env"


def test_folder_settings_that_cannot_be_written(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match=r"^cache_dir: .*afile is a file, not a folder \(p.yaml\)$"):
        check_writable_dir(tmp_path / "afile", "cache_dir", "p.yaml")
    with pytest.raises(ConfigError, match=r"^output_dir: .*afile/out cannot be created: .*afile is a file"):
        check_writable_dir(tmp_path / "afile" / "out", "output_dir", "p.yaml")
    check_writable_dir(tmp_path / "new" / "deeper", "cache_dir", "p.yaml")  # creatable: fine, nothing made
    assert not (tmp_path / "new").exists()


def test_folder_without_write_permission(tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != locked)  # root writes through chmod
    with pytest.raises(UsageError, match=r"^cache_dir: .*locked \(where .*locked/cache would be created\) is not"):
        check_writable_dir(locked / "cache", "cache_dir", "p.yaml")


def test_folder_on_a_read_only_file_system(tmp_path, monkeypatch):
    real = os.statvfs

    class ReadOnly:
        def __init__(self, st):
            self.f_flag = st.f_flag | os.ST_RDONLY

    monkeypatch.setattr(os, "statvfs", lambda p: ReadOnly(real(p)))
    with pytest.raises(UsageError, match=r"output_dir: .* is on a read-only file system"):
        check_writable_dir(tmp_path / "out", "output_dir", "p.yaml")


def test_kdpipe_data_that_does_not_exist_is_an_error(no_system_data, tmp_path, monkeypatch):
    monkeypatch.setenv("KDPIPE_DATA", str(tmp_path / "typo"))
    path = tmp_path / "p.yaml"
    path.write_text("data: {dataset: fashion_mnist, download: false}\n")
    with pytest.raises(UsageError, match=r"^KDPIPE_DATA=.*typo: no such folder"):
        sources.locate_fashion_mnist(load_config(path))
