"""The runner: plan (cache keys, hit or miss, why) → execute (stale stages, each built into its cache entry) →
record (last_run.json), then the reports and gates (:mod:`kdpipe.reporting.outcome`).

Planning (keys, hit or miss, why) needs no torch, so ``kdpipe status`` and an all-cached re-run are fast.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdpipe.cache import Cache, cache_key, key_payload, library_versions
from kdpipe.config import LoadedConfig, load_config, stage_instance, stage_of
from kdpipe.errors import ConfigError, KdpipeError, StageError, UsageError, describe
from kdpipe.fileio import FileDigests, atomic_write_json, clear_folder
from kdpipe.launch import launched
from kdpipe.lock import CacheLock
from kdpipe.ml.data.sources import dataset_fingerprint
from kdpipe.stages import ORDER
from kdpipe.stages.base import METRICS, STAGES, StageContext

log = logging.getLogger("kdpipe")
LAST_RUN = "last_run.json"


@dataclass
class Step:
    """One stage of a plan: its key, what the key is made of, and whether the cache has it.

    With several teachers, a per-teacher stage (:attr:`Stage.per_teacher`) has one step per teacher: ``stage`` is
    then the instance's name (``teacher:r20``), ``kind`` the stage (its code and cache folder) and ``teacher`` the
    teacher it works for; otherwise ``kind`` is ``stage`` and ``teacher`` None."""

    stage: str
    key: str
    payload: dict[str, Any]
    cached: bool
    reason: str = ""
    seconds: float = 0.0
    ran: bool = False
    inputs: dict[str, str] = field(default_factory=dict)
    kind: str = ""
    teacher: str | None = None

    def __post_init__(self) -> None:
        self.kind = self.kind or self.stage

    def config(self, cfg: LoadedConfig) -> LoadedConfig:
        """The config this step's stage sees: a per-teacher instance sees a single-teacher config of its teacher."""
        return cfg.for_teacher(self.teacher) if self.teacher else cfg


def plan(cfg: LoadedConfig, previous: dict[str, Any] | None = None) -> list[Step]:
    """Every stage's cache key, in order, and whether it is cached (and if not, why). With several teachers, a
    per-teacher stage is planned once per teacher, keyed exactly as a single-teacher run of that teacher; a stage
    that needs it reads (and is keyed by) every instance, in config order."""
    cache = Cache(cfg.cache_dir)
    memo = FileDigests(cfg.cache_dir / "fingerprints.json")
    dataset: dict[str, Any] | None = None
    keys: dict[str, str] = {}
    instances: dict[str, list[str]] = {}
    steps = []
    for kind in ORDER:
        stage = STAGES.get(kind)()
        for teacher in cfg.teacher_names if stage.per_teacher and cfg.several_teachers else [None]:
            name = stage_instance(kind, teacher)
            view = cfg.for_teacher(teacher) if teacher else cfg
            with view.member_errors():
                external = stage.external(view, memo)
                config = stage.config(view)
            if stage.uses_data:
                dataset = dataset if dataset is not None else dataset_fingerprint(cfg, memo)
                external = {"dataset": dataset, **external}
            upstream = {label: keys[n] for need in stage.needs for label, n in _upstream(need, teacher, instances)}
            payload = key_payload(kind, stage.version, config, upstream, external, library_versions(stage.libraries))
            keys[name] = cache_key(payload)
            instances.setdefault(kind, []).append(name)
            cached = cache.is_cached(kind, keys[name])
            old = ((previous or {}).get("stages") or {}).get(name, {}).get("payload")
            reason = "" if cached else why_stale(payload, old)
            steps.append(Step(name, keys[name], payload, cached, reason, inputs=upstream, kind=kind, teacher=teacher))
    memo.save()
    return steps


def _upstream(need: str, teacher: str | None, instances: dict[str, list[str]]) -> list[tuple[str, str]]:
    """(name in the step's inputs and key, instance) of stage ``need``'s instances a step reads: a per-teacher
    instance reads its own teacher's under the stage's name (as a single-teacher run does, so their keys are the
    same); any other step every instance, under its name."""
    if teacher and STAGES.get(need).per_teacher:
        return [(need, stage_instance(need, teacher))]
    return [(n, n) for n in instances[need]]


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
    """The last run's record, or None when there is none or it is damaged (any other shape included)."""
    try:
        record = json.loads((cfg.cache_dir / LAST_RUN).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    stages = record.get("stages") if isinstance(record, dict) else None
    if not isinstance(stages, dict) or not all(
        isinstance(s, dict) and isinstance(s.get("key"), str) for s in stages.values()
    ):
        return None
    return record


def run_pipeline(
    config: str | Path | LoadedConfig | None = "pipeline.yaml",
    force: Iterable[str] = (),
    until: str | None = None,
    progress: bool | None = None,
    echo: Callable[[str], None] = print,
    gates: Iterable[str] = (),
    baseline: str | Path | None = None,
    wait: bool = True,
) -> dict[str, Any]:
    """Run every stale stage (up to ``until``), then write and return the report: plan → execute → record.

    Args:
        config: a config file, an already loaded config, or None for the defaults.
        force: stages to re-run even when cached.
        until: stop after this stage.
        progress: show progress bars (default: the config's ``runtime.progress``).
        echo: where one-line status messages go.
        gates: extra ``MODEL.METRIC[@BATCH] >= VALUE`` gates besides the config's.
        baseline: a previous report.json to check regressions against.
        wait: when another process holds the cache, wait for it (saying which process it is); False raises
            :class:`~kdpipe.lock.CacheBusy` (exit 2) at once.

    Returns:
        The report, with its ``gates`` verdicts. Raises :class:`GateFailure` (exit 1) after writing the
        report when a gate failed. Under torchrun, only rank 0 reports; the other ranks return ``{}``.
    """
    from kdpipe.ml.models.teacher_build import with_teacher_data_defaults
    from kdpipe.preflight import preflight
    from kdpipe.reporting.gates import parse_gate
    from kdpipe.reporting.outcome import conclude
    from kdpipe.reporting.report import load_report

    cfg = with_teacher_data_defaults(config if isinstance(config, LoadedConfig) else load_config(config))
    force = list(force)
    for name in [*force, *([until] if until else [])]:
        if name not in ORDER:
            raise UsageError(f"unknown stage '{name}'; stages: {', '.join(ORDER)}")
    gates = list(gates)
    for expression in gates:  # bad gates are bad input: say so before any work
        parse_gate(expression)
    old_report = load_report(cfg, baseline) if baseline else None
    progress = cfg.config.runtime.progress if progress is None else progress
    stopped_after = until if until and until != ORDER[-1] else None
    with ExitStack() as held:
        with _launched_role(cfg) as role:
            if role == "follower":
                _follow(cfg)
                return {}
            held.enter_context(CacheLock(cfg.cache_dir, wait=wait))  # one process at a time on a cache
            started = time.time()
            steps = plan(cfg, read_last_run(cfg))
            if until:
                steps = [s for s in steps if ORDER.index(s.kind) <= ORDER.index(until)]
            stale = [s.stage for s in steps if s.kind in force or not s.cached]
            gate_list = [parse_gate(g) for g in gates]
            cached = {s.stage: Cache(cfg.cache_dir).entry(s.kind, s.key) for s in steps if s.stage not in stale}
            preflight(
                cfg, stale, gate_list, complete=stopped_after is None, baseline=old_report or False, entries=cached
            )
            execute(cfg, steps, force, progress, echo, announce=role == "leader")
            record = record_run(cfg, steps, started)
        return conclude(cfg, record, stopped_after, gates, old_report, echo)  # still holding the lock


@contextmanager
def _launched_role(cfg: LoadedConfig) -> Iterator[str | None]:
    """This process's torchrun role (None, "leader" or "follower"), told by the environment: a plain run imports
    no torch for it; only one of several torchrun ranks joins the process group
    (:mod:`kdpipe.ml.runtime.distributed`)."""
    if launched() is None:
        yield None
        return
    from kdpipe.ml.runtime.distributed import launched_role

    with launched_role(cfg) as role:
        yield role


def execute(
    cfg: LoadedConfig,
    steps: list[Step],
    force: list[str],
    progress: bool,
    echo: Callable[[str], None],
    announce: bool = False,
) -> None:
    """Run the stale steps in order, each built into its cache entry. With ``announce`` (torchrun's rank 0), tell
    the other ranks which stages run and wait for them after each."""
    cache = Cache(cfg.cache_dir)
    stale = [s for s in steps if s.kind in force or cache.lookup(s.kind, s.key) is None]
    if announce:
        from kdpipe.ml.runtime.distributed import broadcast_object

        broadcast_object(stale)
    if stale:
        _prepare(cfg, stale)
    memo: dict[str, Any] = {}
    names = {s.stage for s in stale}
    for step in steps:
        if step.stage not in names:
            echo(f"✓ {step.stage:<9} cached  {step.key[:12]}")
            continue
        why = "forced" if step.kind in force else (step.reason or "not in the cache")
        echo(f"▶ {step.stage:<9} running {step.key[:12]} ({why})")
        t0 = time.perf_counter()
        with cache.building(step.kind, step.key, step.payload, replace=step.kind in force) as build:
            ctx = _context(cfg, cache, step, build.dir, build.work_dir, echo, progress, memo)
            atomic_write_json(build.dir / METRICS, _run_stage(step, ctx))
            step.seconds = time.perf_counter() - t0
            build.extra["seconds"] = step.seconds
        step.ran = True
        echo(f"✓ {step.stage:<9} done    {step.key[:12]} in {step.seconds:.1f}s")
        if announce:
            from kdpipe.ml.runtime.distributed import barrier

            barrier()


def record_run(cfg: LoadedConfig, steps: list[Step], started: float) -> dict[str, Any]:
    """Write ``last_run.json`` (what ran, what was cached, every key's payload) and return it."""
    record = {
        "config_file": str(cfg.path) if cfg.path else None,
        "started": started,
        "finished": time.time(),
        "stages": {
            s.stage: {
                "key": s.key,
                "cached": not s.ran,
                "seconds": s.seconds,
                "payload": s.payload,
                **({"stage": s.kind} if s.kind != s.stage else {}),  # a per-teacher instance: its stage's folder
            }
            for s in steps
        },
    }
    target = cfg.cache_dir / LAST_RUN
    clear_folder(target)  # damaged state: a folder in the record's place
    atomic_write_json(target, record)
    return record


def _context(
    cfg: LoadedConfig,
    cache: Cache,
    step: Step,
    out_dir: Path,
    work_dir: Path,
    echo: Callable[[str], None],
    progress: bool,
    memo: dict[str, Any],
) -> StageContext:
    """The one place a StageContext is built (rank 0 and the other torchrun ranks alike)."""
    return StageContext(
        cfg=step.config(cfg),
        stage=step.kind,
        inputs={n: cache.entry(stage_of(n), k) for n, k in step.inputs.items()},
        out_dir=out_dir,
        work_dir=work_dir,
        log=echo,
        progress=progress,
        memo=memo,
        key=step.key,
    )


def _run_stage(step: Step, ctx: StageContext) -> dict[str, Any]:
    """Run one stage; an unexpected exception becomes a one-line :class:`StageError` naming the stage (instance)."""
    try:
        with ctx.cfg.member_errors():
            return STAGES.get(step.kind)().run(ctx)
    except KdpipeError:
        raise
    except Exception as exc:
        raise StageError(step.stage, describe(exc, limit=None)) from exc


def _prepare(cfg: LoadedConfig, steps: list[Step]) -> None:
    """Before the first stage runs: set torch threads, refuse impossible runtime settings, and run every planned
    stage's :meth:`~kdpipe.stages.base.Stage.check`, so a typo fails now rather than after the teacher trained."""
    import torch

    from kdpipe.ml.runtime.device import pick_device

    if cfg.config.runtime.threads:
        torch.set_num_threads(cfg.config.runtime.threads)
    if cfg.config.runtime.nproc > 1 and pick_device(cfg.config.runtime.device).type == "cuda":
        raise ConfigError(
            "runtime.nproc",
            "forks CPU workers, which CUDA does not allow; on GPUs start one process per GPU with torchrun: "
            "torchrun --standalone --nproc_per_node N -m kdpipe.cli run -c CONFIG (or set runtime.device: cpu)",
            cfg.source,
        )
    for step in steps:
        view = step.config(cfg)
        with view.member_errors():
            STAGES.get(step.kind)().check(view)


def _follow(cfg: LoadedConfig) -> None:
    """A torchrun rank other than 0: rank 0 says which stages run; this rank trains beside it in those that
    train (:meth:`Stage.data_parallel`), writing to a scratch folder, never to the cache, and waits for it
    after every stage that runs (so the next stage finds its inputs committed)."""
    import tempfile

    from kdpipe.ml.runtime.distributed import barrier, broadcast_object

    cache = Cache(cfg.cache_dir)
    runs: list[Step] = broadcast_object(None)
    if runs:
        _prepare(cfg, runs)
    memo: dict[str, Any] = {}
    for step in runs:
        if STAGES.get(step.kind)().data_parallel(step.config(cfg)):
            with tempfile.TemporaryDirectory(prefix=f"kdpipe-{step.kind}-") as scratch:
                # rank 0's work dir: its checkpoints, so this rank resumes as it does
                work = cache.work_dir(step.kind, step.key)
                ctx = _context(cfg, cache, step, Path(scratch), work, lambda _: None, False, memo)
                with ctx.cfg.member_errors():
                    STAGES.get(step.kind)().run(ctx)
        barrier()


def clean(cfg: LoadedConfig, keep_last: bool = False, wait: bool = True) -> int:
    """Remove cache entries (all, or all but the last run's). Returns how many were removed. Holds the cache's
    lock: a run using the cache is waited for (or, with ``wait=False``, named in a :class:`CacheBusy`)."""
    if not cfg.cache_dir.is_dir():
        return _clean(cfg, keep_last)
    with CacheLock(cfg.cache_dir, wait=wait):
        return _clean(cfg, keep_last)


def _clean(cfg: LoadedConfig, keep_last: bool) -> int:
    last = read_last_run(cfg) if keep_last else None
    keep: dict[str, set[str]] | None = None
    if last:
        keep = {}
        for n, s in last["stages"].items():
            keep.setdefault(str(s.get("stage") or stage_of(n)), set()).add(s["key"])
    removed = Cache(cfg.cache_dir).clean(keep)
    if not keep_last:
        (cfg.cache_dir / LAST_RUN).unlink(missing_ok=True)
        if cfg.output_dir.exists():
            shutil.rmtree(cfg.output_dir)
    return removed
