"""Edge bundles: the last run's ONNX files plus a single-file runner that needs only numpy and onnxruntime.

A bundle is a folder (or a ``.tar.gz`` of one) holding the chosen models' ``.onnx`` files, ``samples.npz`` (when the
run saved one: test images and each model's expected logits, for a parity check on the device), ``runner.py`` (a copy
of ``kdpipe/edge/runner.py``), ``spec.json`` (what the runner measures), ``bundle.json`` (what is in it), the
run's ``MODEL_CARD.md`` and a ``README.txt``. It is built in a temporary folder and moved into place, so an error
never leaves half a bundle.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

from kdpipe.config import LoadedConfig
from kdpipe.edge import RUNNER as RUNNER_SOURCE
from kdpipe.errors import UsageError
from kdpipe.fileio import atomic_path, sha256_file
from kdpipe.reporting.model_card import FILE as MODEL_CARD
from kdpipe.reporting.model_card import render_model_card
from kdpipe.reporting.report import load_report
from kdpipe.version import __version__

SAMPLES = "samples.npz"
RUNNER = "runner.py"
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz")
README = """\
kdpipe edge bundle ({models})

Benchmark these ONNX models on this device; needs only Python 3.8+, numpy and onnxruntime:

    pip install onnxruntime numpy      # if they are not installed yet
    python3 runner.py spec.json --out results.json

spec.json says what is measured (batch sizes, threads, providers, timing); edit it to change the grid.
results.json holds latency percentiles, throughput and peak memory per model and batch size{samples}.
`kdpipe bench --target ssh://user@host` does all of this over ssh and merges the results into report.json.
bundle.json lists the files with their sha256, the class names, the input shape and the normalisation.
MODEL_CARD.md says what the model is, how accurate, fast and big it is, its limitations and its provenance.
"""


def runner_source() -> Path:
    """Where the single-file runner (``kdpipe/edge/runner.py``) lives: it is part of the installed package."""
    return RUNNER_SOURCE


def is_archive(out: Path) -> bool:
    return out.name.endswith(ARCHIVE_SUFFIXES)


def select_models(report: dict[str, Any], models: list[str] | None) -> dict[str, str]:
    """{name: onnx file name} of the chosen models (default: every model of the report that has an ONNX file)."""
    models_ = report.get("models", {})
    exported = {name: m["onnx"]["file"] for name, m in models_.items() if (m.get("onnx") or {}).get("file")}
    if not exported:
        raise UsageError("the last run exported no ONNX model; run `kdpipe run` through the export stage first")
    if not models:
        return exported
    unknown = [m for m in models if m not in exported]
    if unknown:
        raise UsageError(f"unknown model '{unknown[0]}'; the last run exported: {', '.join(exported)}")
    return {name: exported[name] for name in dict.fromkeys(models)}


def bench_spec(cfg: LoadedConfig, report: dict[str, Any], files: dict[str, str], samples: bool) -> dict[str, Any]:
    """The runner's spec.json from the config's benchmark section and the report's input shape."""
    bench = cfg.config.benchmark
    shape = (report.get("dataset") or {}).get("input_shape")
    if not shape:
        raise UsageError("the report has no dataset.input_shape; re-run `kdpipe run`")
    # 'available' means "whatever this onnxruntime offers" on the build machine; on a device the CPU is the safe bet.
    providers = list(dict.fromkeys("CPUExecutionProvider" if p == "available" else p for p in bench.providers))
    spec: dict[str, Any] = {
        "models": files,
        "input_shape": list(shape),
        "batch_sizes": list(bench.batch_sizes),
        "threads": list(bench.intra_op_threads),
        "providers": providers,
        "warmup": bench.warmup,
        "min_runs": bench.min_runs,
        "min_seconds": bench.min_seconds,
        "max_seconds": bench.max_seconds,
        "rounds": bench.rounds,
        "seed": 0,
    }
    if samples:
        spec["samples"] = SAMPLES
    return spec


def _normalisation(cfg: LoadedConfig, report: dict[str, Any], first_model: Path) -> dict[str, Any]:
    """mean/std from the report, else the config, else the ONNX metadata the export stage stamps; {} if unknown."""
    dataset = report.get("dataset") or {}
    if dataset.get("mean") and dataset.get("std"):
        return {"mean": dataset["mean"], "std": dataset["std"]}
    if cfg.config.data.normalize is not None:
        return {"mean": list(cfg.config.data.normalize.mean), "std": list(cfg.config.data.normalize.std)}
    try:
        import onnx

        props = {p.key: p.value for p in onnx.load(str(first_model), load_external_data=False).metadata_props}
        return {k: [float(v) for v in props[k].split(",")] for k in ("mean", "std")}
    except Exception:  # no onnx, no metadata, or not numbers: the normalisation is simply unknown
        return {}


def _write_samples(src: Path, dst: Path, names: list[str]) -> None:
    """Copy samples.npz keeping the images, labels and the chosen models' expected logits only."""
    import numpy as np

    try:
        with np.load(src) as npz:
            keep = {k: npz[k] for k in npz.files if not k.startswith("expected_") or k[9:] in names}
    except Exception as exc:  # zip, pickle and format errors all mean an unusable file
        raise UsageError(f"{src}: cannot read the samples ({exc}); re-run `kdpipe run --force export`") from None
    with dst.open("wb") as f:
        np.savez(f, **keep)


def tune_recommended(cfg: LoadedConfig, report: dict[str, Any], files: dict[str, str]) -> dict[str, Any] | None:
    """Tune the session of the report's recommended model (when the bundle holds it) on this machine and write
    ``MODEL.session.json`` beside it in the output folder; returns the tuning record, or None."""
    from kdpipe.edge.session_tuning import tune_session, write_session

    name = (report.get("deployment") or {}).get("recommended")
    if name not in files:
        return None
    bench = cfg.config.benchmark
    timing = {"warmup": bench.warmup, "min_runs": bench.min_runs, "min_seconds": bench.min_seconds,
              "max_seconds": bench.max_seconds, "rounds": bench.rounds}  # fmt: skip
    shape = (report.get("dataset") or {}).get("input_shape")
    providers = [p for p in bench.providers if p != "available"] or None
    tuned = tune_session(cfg.output_dir / files[name], list(shape), providers=providers, timing=timing)
    write_session(cfg.output_dir / files[name], tuned)
    return {"model": name, **tuned}


def populate(cfg: LoadedConfig, report: dict[str, Any], files: dict[str, str], dest: Path) -> None:
    """Write every file of the bundle into the existing, empty folder ``dest`` (with each model's tuned session
    settings, ``MODEL.session.json``, where the output folder has them)."""
    from kdpipe.edge.runner import session_path

    src_dir = cfg.output_dir
    for name, file in files.items():
        if not (src_dir / file).is_file():
            raise UsageError(f"model '{name}': {src_dir / file} is missing; re-run `kdpipe run`")
    runner = runner_source()
    if not runner.is_file():
        raise UsageError(f"the edge runner is missing from this installation: {runner}")
    samples = (src_dir / SAMPLES).is_file()
    spec = bench_spec(cfg, report, files, samples)
    entries = {}
    for name, file in files.items():
        shutil.copyfile(src_dir / file, dest / file)
        entries[name] = {"file": file, "bytes": (dest / file).stat().st_size, "sha256": sha256_file(dest / file)}
        session = Path(session_path(str(src_dir / file)))
        if session.is_file():
            shutil.copyfile(session, dest / session.name)
            entries[name]["session"] = session.name
    if samples:
        _write_samples(src_dir / SAMPLES, dest / SAMPLES, list(files))
    shutil.copyfile(runner, dest / RUNNER)
    dataset = report.get("dataset") or {}
    meta = {
        "schema": "kdpipe.bundle/1",
        "kdpipe_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "report_created": report.get("created"),
        "models": entries,
        "classes": dataset.get("classes"),
        "input_shape": spec["input_shape"],
        "layout": "NCHW",
        **_normalisation(cfg, report, dest / next(iter(files.values()))),
        "samples": SAMPLES if samples else None,
        "runner": RUNNER,
        "spec": "spec.json",
    }
    (dest / "spec.json").write_text(json.dumps(spec, indent=2) + "\n", encoding="utf-8")
    (dest / "bundle.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    (dest / MODEL_CARD).write_text(render_model_card(report), encoding="utf-8")
    note = ", with a parity check against the expected logits in samples.npz" if samples else ""
    (dest / "README.txt").write_text(README.format(models=", ".join(files), samples=note), encoding="utf-8")


def _place_folder(built: Path, out: Path) -> None:
    """Move the finished bundle to ``out``, replacing an empty folder or an earlier bundle, nothing else."""
    old = None
    if out.exists():
        if not out.is_dir():
            raise UsageError(f"{out} exists and is not a folder; give a new folder or a .tar.gz file")
        if any(out.iterdir()):
            if not (out / "bundle.json").is_file():
                raise UsageError(f"{out} is not empty and not a kdpipe bundle; give a new or empty folder")
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
        else:
            out.rmdir()
    os.replace(built, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_archive(built: Path, out: Path) -> None:
    """Write ``out`` (a .tar.gz whose single top folder is named after it) atomically: temp file, then os.replace."""
    if out.is_dir():
        raise UsageError(f"{out} is a folder; give a .tar.gz file name")
    top = out.name.removesuffix(".tar.gz").removesuffix(".tgz") or "bundle"
    with atomic_path(out) as tmp, tarfile.open(tmp, mode="w:gz") as tar:
        for path in sorted(built.iterdir()):
            tar.add(path, arcname=f"{top}/{path.name}", recursive=False)


def make_bundle(cfg: LoadedConfig, out: Path, models: list[str] | None = None, tune: bool = False) -> Path:
    """Write an edge bundle of the last run to ``out`` (a folder, or a .tar.gz file) and return ``out``.

    ``tune``: first tune the recommended model's ONNX Runtime session here (:func:`tune_recommended`).

    Raises:
        UsageError: no report, an unknown model name, a missing model file, or an ``out`` that cannot be used.
    """
    out = Path(out).expanduser().absolute()
    report = load_report(cfg)
    files = select_models(report, models)
    if tune:
        tune_recommended(cfg, report, files)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Built beside `out` so that the final rename stays on one file system.
    work = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        built = work / "bundle"
        built.mkdir()
        populate(cfg, report, files, built)
        if is_archive(out):
            _write_archive(built, out)
        else:
            _place_folder(built, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out
