import json
import logging
import os

from kdpipe.cache import Cache, cache_key, canonical_json, key_payload
from kdpipe.fileio import FileDigests

PAYLOAD = key_payload(
    "distill",
    1,
    {"distill": {"student": "resnet8", "factor": 2, "train": {"epochs": 3, "lr": 0.1}}},
    {"teacher": "ab" * 32},
    {"dataset": {"dataset": "fashion_mnist", "files": {"train-images-idx3-ubyte": "cd" * 32}}},
    {"torch": "2.14.1"},
)


def test_pinned_key():
    # If this changes, every user's cache is invalidated: change it only on purpose.
    assert cache_key(PAYLOAD) == "84ded01c48dbd02704204c3c9426d51b3ce8722ca77e87158e15f23b8a9dbc56"


def test_canonical_json_ignores_key_order():
    assert canonical_json({"b": 1, "a": [1, {"d": 2, "c": 3}]}) == '{"a":[1,{"c":3,"d":2}],"b":1}'
    assert cache_key({"x": 1, "y": 2}) == cache_key({"y": 2, "x": 1})


def _commit(cache: Cache, key: str = "k" * 64):
    staging = cache.staging_dir("teacher", key)
    (staging / "model.bin").write_bytes(b"weights")
    (staging / "sub").mkdir()
    (staging / "sub" / "m.json").write_text("{}")
    cache.work_dir("teacher", key).mkdir(parents=True)
    return cache.commit("teacher", key, staging, {"p": 1}, {"seconds": 1.5}), key


def test_commit_then_hit(tmp_path):
    cache = Cache(tmp_path)
    _, key = _commit(cache)
    manifest = cache.lookup("teacher", key)
    assert manifest["files"]["model.bin"]["bytes"] == 7 and manifest["payload"] == {"p": 1}
    assert cache.is_cached("teacher", key)
    assert not cache.work_dir("teacher", key).exists()  # scratch goes once committed
    assert not list((tmp_path / "teacher").glob(".tmp-*"))


def test_damaged_entries_are_misses_and_removed(tmp_path, caplog):
    cache = Cache(tmp_path)
    entry, key = _commit(cache)
    (entry / "model.bin").write_bytes(b"weightz")  # same size: only the hash can tell
    st = (entry / "model.bin").stat()  # a later write has a later mtime (filesystem clocks can be coarse)
    os.utime(entry / "model.bin", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    with caplog.at_level(logging.WARNING, logger="kdpipe"):
        assert cache.lookup("teacher", key) is None
    assert "damaged (file model.bin changed)" in caplog.text
    assert not entry.exists()

    entry, key = _commit(cache)
    (entry / "manifest.json").write_text("{not json")
    assert cache.lookup("teacher", key) is None and not cache.is_cached("teacher", key)

    entry, key = _commit(cache)
    (entry / "manifest.json").unlink()  # a run killed before the manifest was written
    assert cache.lookup("teacher", key) is None


def test_uncommitted_staging_is_not_an_entry(tmp_path):
    cache = Cache(tmp_path)
    staging = cache.staging_dir("teacher", "a" * 64)
    (staging / "half.bin").write_bytes(b"x")
    assert cache.lookup("teacher", "a" * 64) is None


def test_fingerprint_memo_rehashes_only_changed_files(tmp_path, monkeypatch):
    f = tmp_path / "data.bin"
    f.write_bytes(b"one")
    memo = FileDigests(tmp_path / "fp.json")
    first = memo.file(f)
    memo.save()
    calls = []
    import kdpipe.fileio as fileio_mod

    real = fileio_mod.sha256_file
    monkeypatch.setattr(fileio_mod, "sha256_file", lambda p: calls.append(p) or real(p))
    again = FileDigests(tmp_path / "fp.json")
    assert again.file(f) == first and calls == []
    f.write_bytes(b"two!")
    assert again.file(f) != first and len(calls) == 1
    assert json.loads((tmp_path / "fp.json").read_text())


def test_a_forced_rebuild_replaces_the_entry(tmp_path):
    cache = Cache(tmp_path)
    entry, key = _commit(cache)
    staging = cache.staging_dir("teacher", key)
    (staging / "model.bin").write_bytes(b"retrained")
    cache.commit("teacher", key, staging, {"p": 2}, {}, replace=True)
    assert (entry / "model.bin").read_bytes() == b"retrained"
    assert cache.lookup("teacher", key)["payload"] == {"p": 2}
    assert [p.name for p in (tmp_path / "teacher").iterdir()] == [key]
