"""The runner: plans cache keys, runs stale stages in order, commits their outputs, records the run.

Planning (keys, hit or miss, why) needs no torch, so ``kdpipe status`` and an all-cached re-run are fast.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdpipe.cache import Cache, cache_key, key_payload, library_versions
from kdpipe.config import LoadedConfig, launched_world_size, load_config
from kdpipe.errors import ConfigError, GateFailure, KdpipeError, StageError, UsageError
from kdpipe.fileio import FileDigests
from kdpipe.ml.sources import dataset_fingerprint
from kdpipe.stages import ORDER
from kdpipe.stages.base import METRICS, STAGES, StageContext

log = logging.getLogger("kdpipe")
LAST_RUN = "last_run.json"


@dataclass
class Step:
    """One stage of a plan: its key, what the key is made of, and whether the cache has it."""

    stage: str
    key: str
    payload: dict[str, Any]
    cached: bool
    reason: str = ""
    seconds: float = 0.0
    ran: bool = False
    inputs: dict[str, str] = field(default_factory=dict)


def plan(cfg: LoadedConfig, previous: dict[str, Any] | None = None) -> list[Step]:
    """Every stage's cache key, in order, and whether it is cached (and if not, why)."""
    cache = Cache(cfg.cache_dir)
    memo = FileDigests(cfg.cache_dir / "fingerprints.json")
    dataset: dict[str, Any] | None = None
    keys: dict[str, str] = {}
    steps = []
    for name in ORDER:
        stage = STAGES.get(name)()
        external = stage.external(cfg, memo)
        if stage.uses_data:
            dataset = dataset if dataset is not None else dataset_fingerprint(cfg, memo)
            external = {"dataset": dataset, **external}
        payload = key_payload(
            name,
            stage.version,
            stage.config(cfg),
            {n: keys[n] for n in stage.needs},
            external,
            library_versions(stage.libraries),
        )
        keys[name] = cache_key(payload)
        cached = cache.is_cached(name, keys[name])
        old = ((previous or {}).get("stages") or {}).get(name, {}).get("payload")
        reason = "" if cached else why_stale(payload, old)
        steps.append(Step(name, keys[name], payload, cached, reason, inputs={n: keys[n] for n in stage.needs}))
    memo.save()
    return steps


def why_stale(payload: dict[str, Any], old: dict[str, Any] | None) -> str:
    """A short human reason: which config keys, upstream stages, files or versions changed."""
    if not old:
        return "not in the cache"
    reasons = []
    for path, (a, b) in _diff(old.get("config", {}), payload["config"]).items():
        reasons.append(f"{path} {json.dumps(a)} → {json.dumps(b)}")
    changed_up = [n for n in payload["upstream"] if old.get("upstream", {}).get(n) != payload["upstream"][n]]
    if changed_up:
        reasons.append("upstream " + ", ".join(changed_up) + " changed")
    if old.get("external") != payload["external"]:
        reasons.append("input files changed")
    for lib, ver in payload["libraries"].items():
        if old.get("libraries", {}).get(lib) != ver:
            reasons.append(f"{lib} {old.get('libraries', {}).get(lib)} → {ver}")
    if old.get("version") != payload["version"]:
        reasons.append("stage code version changed")
    return "; ".join(reasons) or "not in the cache (removed or damaged)"


def _diff(a: Any, b: Any, prefix: str = "") -> dict[str, tuple[Any, Any]]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: dict[str, tuple[Any, Any]] = {}
        for k in sorted(set(a) | set(b)):
            out.update(_diff(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else k))
        return out
    return {} if a == b else {prefix: (a, b)}


def read_last_run(cfg: LoadedConfig) -> dict[str, Any] | None:
    try:
        return json.loads((cfg.cache_dir / LAST_RUN).read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False))
    os.replace(tmp, path)


def _prepare(cfg: LoadedConfig, steps: list[Step]) -> None:
    """Before the first stage runs: set torch threads, and check model names so that a typo in
    ``distill.student`` fails now rather than after the teacher has trained."""
    import torch

    from kdpipe.ml.training import pick_device
    from kdpipe.ml.zoo import create_model
    from kdpipe.registry import UnknownNameError

    if cfg.config.runtime.threads:
        torch.set_num_threads(cfg.config.runtime.threads)
    if cfg.config.runtime.nproc > 1 and pick_device(cfg.config.runtime.device).type == "cuda":
        raise ConfigError(
            "runtime.nproc",
            "forks CPU workers, which CUDA does not allow; on GPUs start one process per GPU with torchrun: "
            "torchrun --standalone --nproc_per_node N -m kdpipe.cli run -c CONFIG (or set runtime.device: cpu)",
            cfg.source,
        )
    to_run = {s.stage for s in steps}
    conf = cfg.config
    names = []
    if "teacher" in to_run and conf.teacher.source != "torchscript":
        names.append(("teacher.arch", conf.teacher.arch or ""))
    if "distill" in to_run:
        names.append(("distill.student", conf.distill.student))
    for key, name in names:
        try:
            create_model(name, num_classes=2, in_channels=1)
        except UnknownNameError as exc:
            raise ConfigError(key, str(exc), cfg.source) from None


def run_pipeline(
    config: str | Path | LoadedConfig | None = "pipeline.yaml",
    force: Iterable[str] = (),
    until: str | None = None,
    progress: bool | None = None,
    echo: Callable[[str], None] = print,
    gates: Iterable[str] = (),
    baseline: str | Path | None = None,
) -> dict[str, Any]:
    """Run every stale stage (up to ``until``), then write and return the report.

    Args:
        config: a config file, an already loaded config, or None for the defaults.
        force: stages to re-run even when cached.
        until: stop after this stage.
        progress: show progress bars (default: the config's ``runtime.progress``).
        echo: where one-line status messages go.
        gates: extra ``MODEL.METRIC[@BATCH] >= VALUE`` gates besides the config's.
        baseline: a previous report.json to check regressions against.

    Returns:
        The report, with its ``gates`` verdicts. Raises :class:`GateFailure` (exit 1) after writing the
        report when a gate failed. Under torchrun, only rank 0 reports; the other ranks return ``{}``.
    """
    from kdpipe.reporting.gates import parse_gate
    from kdpipe.reporting.report import load_report

    cfg = config if isinstance(config, LoadedConfig) else load_config(config)
    for name in [*force, *([until] if until else [])]:
        if name not in ORDER:
            raise UsageError(f"unknown stage '{name}'; stages: {', '.join(ORDER)}")
    gates = list(gates)
    for expression in gates:  # bad gates are bad input: say so before any work
        parse_gate(expression)
    old_report = load_report(cfg, baseline) if baseline else None
    progress = cfg.config.runtime.progress if progress is None else progress
    group = _join_group(cfg) if launched_world_size() > 1 else None
    try:
        if group == "follower":
            _follow(cfg)
            return {}
        return _lead(cfg, force, until, progress, echo, gates, old_report, announce=group == "leader")
    finally:
        if group:
            from kdpipe.ml.distributed import leave

            leave()


def _join_group(cfg: LoadedConfig) -> str:
    """Under torchrun: join the process group; rank 0 is the "leader", every other rank a "follower"."""
    from kdpipe.ml.distributed import join_launched
    from kdpipe.ml.training import pick_device

    if cfg.config.runtime.nproc > 1:
        raise ConfigError(
            "runtime.nproc",
            f"forks its own workers; under torchrun the process count is its --nproc_per_node "
            f"({launched_world_size()} here): drop --nproc / runtime.nproc",
            cfg.source,
        )
    return "leader" if join_launched(pick_device(cfg.config.runtime.device)) == 0 else "follower"


def _follow(cfg: LoadedConfig) -> None:
    """A torchrun rank other than 0: rank 0 says which stages run; this rank trains beside it in those that
    train (:meth:`Stage.data_parallel`), writing to a scratch folder, never to the cache, and waits for it
    after every stage that runs (so the next stage finds its inputs committed)."""
    import tempfile

    from kdpipe.ml.distributed import barrier, broadcast_object

    cache = Cache(cfg.cache_dir)
    runs: list[Step] = broadcast_object(None)
    if runs:
        _prepare(cfg, runs)
    shared: dict[str, Any] = {}
    for step in runs:
        stage = STAGES.get(step.stage)()
        if stage.data_parallel(cfg):
            with tempfile.TemporaryDirectory(prefix=f"kdpipe-{step.stage}-") as scratch:
                ctx = StageContext(
                    cfg=cfg,
                    inputs={n: cache.entry(n, k) for n, k in step.inputs.items()},
                    out_dir=Path(scratch),
                    work_dir=cache.work_dir(step.stage, step.key),  # rank 0's checkpoints: resume as it does
                    log=lambda _: None,
                    progress=False,
                    cache=shared,
                    key=step.key,
                )
                stage.run(ctx)
        barrier()


def _lead(
    cfg: LoadedConfig,
    force: Iterable[str],
    until: str | None,
    progress: bool,
    echo: Callable[[str], None],
    gates: list[str],
    old_report: dict[str, Any] | None,
    announce: bool = False,
) -> dict[str, Any]:
    """Rank 0's (or the only process's) run: plan, run stale stages, commit, report, gate. With ``announce``
    (under torchrun), tell the other ranks which stages run and wait for them after each."""
    from kdpipe.reporting.gates import format_table, parse_gate, recommend, run_gates
    from kdpipe.reporting.report import build_report, publish

    previous = read_last_run(cfg)
    steps = plan(cfg, previous)
    if until:
        steps = steps[: ORDER.index(until) + 1]
    cache = Cache(cfg.cache_dir)
    stale = [s for s in steps if s.stage in force or cache.lookup(s.stage, s.key) is None]
    stale_names = {s.stage for s in stale}
    if announce:
        from kdpipe.ml.distributed import barrier, broadcast_object

        broadcast_object(stale)
    shared: dict[str, Any] = {}
    started = time.time()
    if stale:
        _prepare(cfg, stale)
    for step in steps:
        if step.stage not in stale_names:
            echo(f"✓ {step.stage:<9} cached  {step.key[:12]}")
            continue
        why = "forced" if step.stage in force else (step.reason or "not in the cache")
        echo(f"▶ {step.stage:<9} running {step.key[:12]} ({why})")
        stage = STAGES.get(step.stage)()
        staging = cache.staging_dir(step.stage, step.key)
        work = cache.work_dir(step.stage, step.key)
        work.mkdir(parents=True, exist_ok=True)
        ctx = StageContext(
            cfg=cfg,
            inputs={n: cache.entry(n, k) for n, k in step.inputs.items()},
            out_dir=staging,
            work_dir=work,
            log=echo,
            progress=progress,
            cache=shared,
            key=step.key,
        )
        t0 = time.perf_counter()
        try:
            metrics = stage.run(ctx)
            (staging / METRICS).write_text(json.dumps(metrics, indent=2))
        except KdpipeError:
            cache.abandon(staging)
            raise
        except BaseException as exc:
            cache.abandon(staging)
            if isinstance(exc, Exception):
                first_line = (str(exc).strip().splitlines() or [""])[0]
                raise StageError(step.stage, f"{type(exc).__name__}: {first_line}") from exc
            raise
        step.seconds = time.perf_counter() - t0
        step.ran = True
        forced = step.stage in force
        cache.commit(step.stage, step.key, staging, step.payload, {"seconds": step.seconds}, replace=forced)
        echo(f"✓ {step.stage:<9} done    {step.key[:12]} in {step.seconds:.1f}s")
        if announce:
            barrier()
    record = {
        "config_file": str(cfg.path) if cfg.path else None,
        "started": started,
        "finished": time.time(),
        "stages": {
            s.stage: {"key": s.key, "cached": not s.ran, "seconds": s.seconds, "payload": s.payload} for s in steps
        },
    }
    _write_json(cfg.cache_dir / LAST_RUN, record)
    report = build_report(cfg, record)
    complete = until is None or until == ORDER[-1]
    if not complete and (cfg.config.gates or gates or old_report):
        echo(f"gates not evaluated: the run stopped after '{until}'")
    elif cfg.config.gates or gates or old_report:
        report["gates"] = run_gates(report, list(cfg.config.gates), gates, old_report, cfg.config.baseline)
    if complete:
        report["deployment"] = recommend(report, [*cfg.config.gates, *(parse_gate(g) for g in gates)])
    publish(cfg, report, record)
    if report["gates"]:
        echo(format_table(report["gates"]))
    failed = [g["name"] for g in report["gates"] if not g["passed"]]
    if failed:
        raise GateFailure(f"{len(failed)} gate{'s' if len(failed) > 1 else ''} failed: {', '.join(failed)}")
    return report


def clean(cfg: LoadedConfig, keep_last: bool = False) -> int:
    """Remove cache entries (all, or all but the last run's). Returns how many were removed."""
    last = read_last_run(cfg) if keep_last else None
    keep = {n: s["key"] for n, s in (last or {}).get("stages", {}).items()} if last else None
    removed = Cache(cfg.cache_dir).clean(keep)
    if not keep_last:
        (cfg.cache_dir / LAST_RUN).unlink(missing_ok=True)
        if cfg.output_dir.exists():
            shutil.rmtree(cfg.output_dir)
    return removed
