"""The run report: ``report.json`` is the machine contract (keys documented in docs/report-json.md); Markdown and
the model card (``markdown.py``, ``model_card.py``) for people."""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

from kdpipe.config import TEACHER, LoadedConfig, stage_instance, stage_of
from kdpipe.errors import UsageError
from kdpipe.fileio import atomic_write_text
from kdpipe.reporting.markdown import render_markdown
from kdpipe.reporting.model_card import FILE as MODEL_CARD
from kdpipe.reporting.model_card import render_model_card
from kdpipe.version import __version__

__all__ = ["build_report", "load_report", "publish", "render_markdown", "write_reports"]

SCHEMA_VERSION = 1
DELIVERABLES = {"distill": ("student.pt", "student.json"), "export": ("*.onnx", "*.ranges.json", "samples.npz")}


def _metrics(cfg: LoadedConfig, record: dict[str, Any], stage: str) -> dict[str, Any] | None:
    info = record["stages"].get(stage)
    if not info:
        return None
    path = cfg.cache_dir / str(info.get("stage") or stage_of(stage)) / info["key"] / "metrics.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def build_report(cfg: LoadedConfig, record: dict[str, Any]) -> dict[str, Any]:
    """Assemble the report from the run record and each stage's metrics."""
    from kdpipe.cache import library_versions

    several = cfg.several_teachers
    names = cfg.teacher_names  # one teacher: ["teacher"], its stage "teacher"; several: each one's teacher:NAME
    members = {n: _metrics(cfg, record, stage_instance(TEACHER, n if several else None)) or {} for n in names}
    distill = _metrics(cfg, record, "distill") or {}
    validate = _metrics(cfg, record, "validate") or {}
    export = _metrics(cfg, record, "export") or {}
    bench = _metrics(cfg, record, "benchmark") or {}
    teacher = _ensemble(members, validate) if several else members[TEACHER]
    models = _trained_models(teacher, distill, validate, export)
    if several and "teacher" in models:  # the ensemble, then each teacher by name
        models["teacher"].update(members=list(members), weights=cfg.teacher_weights)
        models = {"teacher": models.pop("teacher"), **_members(cfg, members, validate), **models}
    models.update(_variants(distill, export, exclude=set(models)))
    _attach_latency(models, bench)
    if "teacher" in models and not several:
        _shipped_teacher(cfg, models["teacher"])
    return {
        "schema_version": SCHEMA_VERSION,
        "kdpipe_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.get("finished", time.time()))),
        "config_file": record.get("config_file"),
        "dataset": teacher.get("data"),
        "models": models,
        "speedup_p50": bench.get("speedup_p50"),
        "comparison": distill.get("comparison") or None,
        "training_data": distill.get("training_data"),  # real (how many images) or synthetic (data-free)
        "benchmark": {k: bench[k] for k in ("providers", "intra_op_threads", "thread_counts", "host") if k in bench}
        or None,
        "training": {
            name: {k: m[k] for k in ("best_epoch", "best_val_top1", "images_per_second", "history") if k in m}
            for name, m in (*members.items(), ("distill", distill))
            if m.get("history")
        },
        "stages": {
            n: {"key": s["key"], "cached": s["cached"], "seconds": round(s["seconds"], 3)}
            for n, s in record["stages"].items()
        },
        "versions": {
            "python": platform.python_version(),
            **library_versions(["torch", "torchvision", "onnx", "onnxruntime", "onnxscript", "numpy"]),
        },
        "gates": [],
        "deployment": None,
    }


def _trained_models(
    teacher: dict[str, Any], distill: dict[str, Any], validate: dict[str, Any], export: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """The teacher's and the student's entries: architecture, parameters, accuracy, ONNX file and parity."""
    models: dict[str, dict[str, Any]] = {}
    for role, train in (("teacher", teacher), ("student", distill)):
        if not train:
            continue
        entry: dict[str, Any] = {
            "arch": train.get("arch") or train.get("student_arch"),
            "parameters": train["parameters"]["total"] if role == "student" else train.get("parameters"),
            "val_top1": train.get("best_val_top1"),
        }
        if role == "student":
            entry["parameters_breakdown"] = train["parameters"]
            entry["method"] = train.get("method")
        if role in validate:
            v = validate[role]
            entry["accuracy"] = {k: v[k] for k in ("samples", "top1", "top5", "per_class_top1", "confusion")}
            if "agreement_with_teacher" in v:
                entry["accuracy"]["agreement_with_teacher"] = v["agreement_with_teacher"]
        if role in export.get("models", {}):
            e = export["models"][role]
            entry["onnx"] = {
                "file": e["file"],
                "file_bytes": e["bytes"],
                "parameters": e["parameters"],
                "opset": e["opset"],
                "exporter": e["exporter"],
                "parity": e["parity"],
            }
            if "macs" in e:  # counted by the export stage
                entry["macs"] = e["macs"]
        models[role] = entry
    return models


def _ensemble(members: dict[str, dict[str, Any]], validate: dict[str, Any]) -> dict[str, Any]:
    """Several teachers' ensemble as the teacher stage would describe one teacher: what the report's ``teacher`` is."""
    if not all(members.values()):
        return {}
    return {
        "arch": "ensemble(" + ", ".join(str(m.get("arch")) for m in members.values()) + ")",
        "parameters": sum(int(m.get("parameters") or 0) for m in members.values()),
        "best_val_top1": (validate.get("teacher") or {}).get("val_top1"),
        "data": next(iter(members.values())).get("data"),
    }


def _members(cfg: LoadedConfig, members: dict[str, dict[str, Any]], validate: dict[str, Any]) -> dict[str, Any]:
    """Each of several teachers, by name: architecture, parameters, val and test accuracy, weight, provenance."""
    out: dict[str, Any] = {}
    for (name, m), weight in zip(members.items(), cfg.teacher_weights, strict=True):
        entry: dict[str, Any] = {
            "arch": m.get("arch"),
            "parameters": m.get("parameters"),
            "val_top1": m.get("best_val_top1"),
            "member_of": TEACHER,
            "weight": weight,
        }
        v = (validate.get("teachers") or {}).get(name)
        if v:
            entry["accuracy"] = {k: v[k] for k in ("samples", "top1", "top5", "per_class_top1", "confusion")}
        _shipped_teacher(cfg.for_teacher(name), entry)
        out[name] = entry
    return out


def _variants(distill: dict[str, Any], export: dict[str, Any], exclude: set[str]) -> dict[str, dict[str, Any]]:
    """Each exported variant of the student: its accuracy, agreement with fp32, file and quantisation."""
    models: dict[str, dict[str, Any]] = {}
    for name, e in export.get("models", {}).items():
        if name in exclude or "variant" not in e:
            continue
        models[name] = {
            "arch": distill.get("student_arch"),
            "variant": e["variant"],
            "parameters": e["parameters"],
            "accuracy": {**e["accuracy"], "agreement_with_fp32": e["parity"]["top1_agreement"]},
            "onnx": {
                "file_bytes": e["bytes"],
                **{k: e[k] for k in ("file", "opset", "exporter", "parity", "parameters")},
            },
        }
        if "quantization" in e:
            models[name]["quantization"] = e["quantization"]
        if "macs" in e:
            models[name]["macs"] = e["macs"]
    return models


def _attach_latency(models: dict[str, dict[str, Any]], bench: dict[str, Any]) -> None:
    """Benchmark figures per model, and which variants are slower than the fp32 student (and at which batch)."""
    for name, entry in models.items():
        if name in bench.get("results", {}):
            entry["latency"] = bench["results"][name]
            entry["latency_matrix"] = bench.get("matrix", {}).get(name, [])
            if "batch_1" in entry["latency"]:
                entry["single_stream_p90_ms"] = entry["latency"]["batch_1"]["p90_ms"]
        if name in (bench.get("pytorch") or {}):
            entry["pytorch_latency"] = bench["pytorch"][name]
        headline = (bench.get("providers") or [None])[0]
        if (bench.get("precision") or {}).get(name, {}).get(headline):
            entry["precision"] = bench["precision"][name][headline]
    fp32 = models.get("student", {}).get("latency", {})
    for entry in models.values():
        if "variant" in entry and "latency" in entry:
            slower = [b for b, cell in entry["latency"].items() if b in fp32 and cell["p50_ms"] > fp32[b]["p50_ms"]]
            entry["slower_than_fp32"] = bool(slower)
            entry["slower_than_fp32_at"] = slower


def _shipped_teacher(cfg: LoadedConfig, entry: dict[str, Any]) -> None:
    """A teacher shipped with kdpipe carries its provenance into the report (and the model card)."""
    import kdpipe.teachers as teachers

    path = cfg.config.teacher.path
    if not teachers.is_shipped(path):
        return
    e = teachers.entry(path)
    recipe = e.get("recipe") or {}
    entry["shipped"] = {
        "name": path.removeprefix(teachers.PREFIX),
        "sha256": e["sha256"],
        "test_top1": e.get("test_top1"),
        "command": recipe.get("command"),
        "config": recipe.get("config"),
        "cache_key": recipe.get("cache_key"),
    }


def _place(src: Path, dst: Path) -> None:
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def publish(cfg: LoadedConfig, report: dict[str, Any], record: dict[str, Any]) -> Path:
    """Write report.json, report.md and the deliverable model files into the output folder."""
    out = cfg.output_dir
    out.mkdir(parents=True, exist_ok=True)
    for stage, patterns in DELIVERABLES.items():
        info = record["stages"].get(stage)
        for pattern in patterns if info else ():
            for src in sorted((cfg.cache_dir / stage / info["key"]).glob(pattern)):
                _place(src, out / src.name)
    return write_reports(out, report)


def write_reports(out: Path, report: dict[str, Any]) -> Path:
    """report.json, report.md and MODEL_CARD.md, each replaced atomically (re-written whenever the report changes)."""
    out.mkdir(parents=True, exist_ok=True)
    texts = {"report.json": json.dumps(report, indent=2), "report.md": render_markdown(report)}
    if report.get("models"):
        texts[MODEL_CARD] = render_model_card(report)
    for name, text in texts.items():
        atomic_write_text(out / name, text)
    return out / "report.json"


def load_report(cfg: LoadedConfig | None, path: str | Path | None = None) -> dict[str, Any]:
    """The last run's report (or ``path``: then ``cfg`` may be None); a missing or malformed file is bad input."""
    if path:
        target = Path(path)
    elif cfg is not None:
        target = cfg.output_dir / "report.json"
    else:
        raise UsageError("no report given: pass --report FILE, or the run's config with -c FILE")
    try:
        report = json.loads(target.read_text(encoding="utf-8"))
    except FileNotFoundError:
        hint = "" if path else "; run `kdpipe run` first"
        raise UsageError(f"no report at {target}{hint}") from None
    except IsADirectoryError:
        raise UsageError(f"{target}: a folder, not a report file") from None
    except (OSError, ValueError) as exc:  # ValueError: bad JSON and bytes that are not UTF-8 alike
        raise UsageError(f"{target}: not a readable JSON report ({type(exc).__name__}: {exc})") from None
    if not isinstance(report, dict):
        raise UsageError(f"{target}: a JSON {type(report).__name__}, not a kdpipe report (an object)")
    if report.get("schema_version") != SCHEMA_VERSION:
        raise UsageError(f"{target}: schema_version {report.get('schema_version')!r}, expected {SCHEMA_VERSION}")
    problem = _shape_problem(report)
    if problem:
        raise UsageError(f"{target}: not a kdpipe report: {problem}")
    return report


def _shape_problem(report: dict[str, Any]) -> str | None:
    """What makes a report of the right version unusable (what gates and renderers read), or None."""
    models = report.get("models", {})
    if not isinstance(models, dict):
        return "`models` is not an object"
    for name, model in models.items():
        if not isinstance(model, dict):
            return f"`models.{name}` is not an object"
        for key in ("accuracy", "onnx", "latency"):
            if key in model and not isinstance(model[key], dict):
                return f"`models.{name}.{key}` is not an object"
    if not isinstance(report.get("gates", []), list) or not all(isinstance(g, dict) for g in report.get("gates", [])):
        return "`gates` is not a list of objects"
    return None
