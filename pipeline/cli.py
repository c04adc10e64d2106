"""The ``kdpipe`` command line. Nothing here imports torch until a stage has to run."""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from pathlib import Path

import click

from kdpipe.errors import KdpipeError, UsageError
from kdpipe.stages import ORDER  # light: stage declarations import no torch
from kdpipe.version import __version__

STAGE_NAMES = ORDER
WRITES = ("cache_dir", "output_dir")
_LOADED: dict[str, Path] = {}  # where this command writes: names the folder when a full disk hides the file
config_option = click.option(
    "-c", "--config", "config_path", default="pipeline.yaml", show_default=True, type=click.Path(dir_okay=False),
    help="Pipeline config file.",
)  # fmt: skip
set_option = click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a config value, e.g. distill.train.epochs=3.",
)


gate_option = click.option(
    "--gate", "gates", multiple=True, metavar="EXPR",
    help="An extra gate, e.g. 'student.top1 >= 0.9' or 'student.p90_ms@1 <= 2.5'.",
)  # fmt: skip
no_wait_option = click.option(
    "--no-wait",
    is_flag=True,
    help="If another kdpipe process holds the cache, fail at once (exit 2) instead of waiting.",
)
baseline_option = click.option(
    "--baseline", type=click.Path(dir_okay=False), help="A previous report.json to check regressions against."
)


def _load(config_path: str, overrides: tuple[str, ...] = (), writes: tuple[str, ...] = ()):
    """Load the config; ``writes`` names the folder settings the command writes to (``cache_dir``,
    ``output_dir``): one that is a file or not writable is bad input, said before anything runs."""
    from kdpipe.config import load_config
    from kdpipe.diskspace import check_folder_layout, check_writable_dir
    from kdpipe.ml.models.teacher_build import with_teacher_data_defaults

    cfg = with_teacher_data_defaults(load_config(config_path, overrides))  # a loaded timm teacher's input size
    _LOADED.update(cache_dir=cfg.cache_dir, output_dir=cfg.output_dir)
    for key in writes:
        check_writable_dir(getattr(cfg, key), key, cfg.source)
    if "output_dir" in writes:
        check_folder_layout(cfg.cache_dir, cfg.output_dir, cfg.path.parent if cfg.path else None, cfg.source)
    return cfg


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kdpipe")
@click.option("-v", "--verbose", is_flag=True, help="Full tracebacks and debug logs.")
@click.pass_context
def cli(ctx: click.Context, verbose: bool) -> None:
    """kdpipe: distil a big image classifier into a small, verified, benchmarked ONNX student.

    Exit codes: 0 success, 1 a gate failed, 2 bad usage or input, 3 a stage failed.
    """
    ctx.obj = {"verbose": verbose}
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING, format="kdpipe: %(levelname)s: %(message)s"
    )


@cli.command()
@config_option
@set_option
@click.option("--force", multiple=True, type=click.Choice(STAGE_NAMES), help="Re-run this stage even if cached.")
@click.option("--until", type=click.Choice(STAGE_NAMES), help="Stop after this stage.")
@click.option("--no-progress", is_flag=True, help="No progress bars (one line per epoch instead).")
@click.option("--nproc", type=click.IntRange(min=1), help="Data-parallel training processes (runtime.nproc).")
@gate_option
@baseline_option
@no_wait_option
def run(
    config_path: str,
    overrides: tuple[str, ...],
    force: tuple[str, ...],
    until: str | None,
    no_progress: bool,
    nproc: int | None,
    gates: tuple[str, ...],
    baseline: str | None,
    no_wait: bool,
) -> None:
    """Run every stale stage, write report.json in the output folder, then evaluate the gates (exit 1 on failure)."""
    from kdpipe.runner import run_pipeline

    cfg = _load(config_path, (*overrides, *([f"runtime.nproc={nproc}"] if nproc else [])), WRITES)
    report = run_pipeline(
        cfg, force=force, until=until, progress=False if no_progress else None, echo=click.echo, gates=gates,
        baseline=baseline, wait=not no_wait,
    )  # fmt: skip
    if not report:  # a torchrun rank other than 0: rank 0 reports
        return
    student = report["models"].get("student", {})
    top1 = student.get("accuracy", {}).get("top1")
    summary = f"student test top-1 {top1:.4f}" if top1 is not None else "no test accuracy yet"
    click.echo(f"report: {cfg.output_dir / 'report.json'} ({summary})")


@cli.command()
@config_option
@set_option
def status(config_path: str, overrides: tuple[str, ...]) -> None:
    """Show each stage as cached or stale, and why."""
    from kdpipe.runner import plan, read_last_run

    cfg = _load(config_path, overrides, ("cache_dir",))
    for step in plan(cfg, read_last_run(cfg)):
        state = "cached" if step.cached else "stale "
        click.echo(f"{step.stage:<10} {state} {step.key[:12]}" + ("" if step.cached else f"  ({step.reason})"))


def _render(fmt: str, data: dict) -> str:
    from kdpipe.reporting.report import render_markdown

    if fmt == "json":
        return json.dumps(data, indent=2) + "\n"
    if fmt == "md":
        return render_markdown(data)
    if fmt == "junit":
        from kdpipe.reporting.junit import render_junit

        return render_junit(data)
    from kdpipe.reporting.html import render_html

    return render_html(data)


@cli.command()
@config_option
@click.option("--format", "fmt", type=click.Choice(["json", "md", "junit", "html"]), default="md", show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write to this file instead of stdout.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="Render this report.json.")
def report(config_path: str, fmt: str, output: str | None, report_path: str | None) -> None:
    """Render the last run's report (json, md, junit or a self-contained html file), or --report FILE (which needs
    no config: a report downloaded from CI renders anywhere)."""
    from kdpipe.reporting.report import load_report

    if report_path:
        where: Path | str = report_path
        data = load_report(None, report_path)
    else:  # the config says where the last run's report is
        _config_for_last_report(config_path)
        cfg = _load(config_path)
        where = cfg.output_dir / "report.json"
        data = load_report(cfg)
    try:
        text = _render(fmt, data)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:  # a report edited or cut short
        raise UsageError(f"{where}: not a complete kdpipe report ({type(exc).__name__}: {exc})") from None
    if output:
        from kdpipe.fileio import atomic_write_text

        atomic_write_text(Path(output), text)
    else:
        click.echo(text, nl=False)
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if fmt == "md" and summary:
        with open(summary, "a", encoding="utf-8") as f:
            f.write(text)


@cli.command()
@config_option
@set_option
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="Gate this report (default: last run).")
@gate_option
@baseline_option
@click.option("--write", is_flag=True, help="Save the verdicts into the gated report.json (and report.md beside it).")
@click.option("--junit", "junit_path", type=click.Path(dir_okay=False), help="Also write the verdicts as JUnit XML.")
@click.option("--md", "md_path", type=click.Path(dir_okay=False), help="Also write the gated report as Markdown.")
@click.pass_context
def gate(
    ctx: click.Context,
    config_path: str,
    overrides: tuple[str, ...],
    report_path: str | None,
    gates: tuple[str, ...],
    baseline: str | None,
    write: bool,
    junit_path: str | None,
    md_path: str | None,
) -> None:
    """Evaluate the gates on the last run (or --report FILE): exit 0 all pass, 1 any fails, 2 bad input.

    Reads only: the report is rewritten with the verdicts only with --write. --junit and --md files are
    written whatever the verdict (CI reads them on failure), and nothing is written on bad input.

    With --report FILE and no config file (a CI artifact on another machine), the gates are the --gate
    expressions, else the gates recorded in the report.
    """
    from kdpipe.fileio import atomic_write_json, atomic_write_text
    from kdpipe.reporting.gates import format_table
    from kdpipe.reporting.junit import render_junit
    from kdpipe.reporting.outcome import judge, raise_on_failure
    from kdpipe.reporting.report import load_report, render_markdown, write_reports

    given = ctx.get_parameter_source("config_path") is not click.core.ParameterSource.DEFAULT
    if report_path is None or given or Path(config_path).exists():
        if report_path is None:
            _config_for_last_report(config_path)
        cfg = _load(config_path, overrides, ("output_dir",) if write and report_path is None else ())
        data = load_report(cfg, report_path)
    else:
        data = load_report(None, report_path)
        cfg = _config_of_report(data, report_path, config_path, overrides, bool(gates or baseline))
    old = load_report(None, baseline) if baseline else None
    judge(data, cfg, gates, old)
    click.echo(format_table(data["gates"]))
    if junit_path:
        atomic_write_text(Path(junit_path), render_junit(data))
    if md_path:
        atomic_write_text(Path(md_path), render_markdown(data))
    if write and report_path is None:
        write_reports(cfg.output_dir, data)
    elif write:
        atomic_write_json(Path(report_path), data)
    raise_on_failure(data)


def _config_for_last_report(config_path: str) -> None:
    """The last run's report is found through its config (``output_dir``): without one, say what else works."""
    if not Path(config_path).exists():
        raise UsageError(
            f"config file not found: {config_path}; pass the run's config with -c FILE, or a report with --report FILE"
        )


def _config_of_report(data: dict, report_path: str, config_path: str, overrides: tuple[str, ...], judged: bool):
    """`kdpipe gate --report FILE` without a config file: the defaults (with --set), and, when no --gate or
    --baseline is given, the gates recorded in the report; when it records none, say in one line what to pass."""
    from kdpipe.config import LoadedConfig, load_config
    from kdpipe.reporting.gates import recorded_gates

    cfg = load_config(None, overrides)
    if judged or cfg.config.gates:
        return cfg
    recorded = recorded_gates(data, report_path)
    if not recorded:
        raise UsageError(
            f"no gates to judge: there is no config file {config_path} here and {report_path} records no gates; "
            "pass --gate 'MODEL.METRIC >= VALUE' (e.g. --gate 'student.top1 >= 0.9'), or the run's config with -c FILE"
        )
    click.echo(f"no config file {config_path}: judging the {len(recorded)} gate(s) recorded in {report_path}", err=True)
    return LoadedConfig(cfg.config.model_copy(update={"gates": recorded}), None)


@cli.command()
@config_option
@set_option
@click.option("--keep-last", is_flag=True, help="Keep the entries of the last run.")
@no_wait_option
def clean(config_path: str, overrides: tuple[str, ...], keep_last: bool, no_wait: bool) -> None:
    """Remove cached stage outputs (and the output folder unless --keep-last); waits for a run using the cache."""
    from kdpipe.runner import clean as do_clean

    removed = do_clean(_load(config_path, overrides, WRITES), keep_last, wait=not no_wait)
    click.echo(f"removed {removed} cache entr{'y' if removed == 1 else 'ies'}")


@cli.command()
def models() -> None:
    """List the model zoo's architectures (torchvision:NAME, timm:NAME and python:FILE.py:FUNC work too)."""
    from kdpipe.ml.models.zoo import model_names

    click.echo("\n".join(model_names()))
    click.echo("torchvision:<name>  (any torchvision classification model)")
    click.echo("timm:<name>  (any timm.list_models() name, built offline; weights from teacher.path)")
    click.echo("python:<file.py or package.module>:<function>  (your own code, run as is; returns an nn.Module)")


@cli.command()
@click.option("--verify", is_flag=True, help="Also check the files' sha256 against the manifest.")
def teachers(verify: bool) -> None:
    """List the teachers shipped with kdpipe (use one with teacher.path: shipped:NAME)."""
    from kdpipe.teachers import describe, manifest
    from kdpipe.teachers import verify as verify_file

    click.echo("\n".join(describe()))
    if verify:
        bad = [name for name in sorted(manifest()) if not verify_file(name)]
        if bad:
            raise UsageError(f"shipped teacher file(s) differ from the manifest's sha256: {', '.join(bad)}; reinstall")
        click.echo(f"sha256 verified: {len(manifest())} file(s)")


@cli.command("config")
@click.option("--show", is_flag=True, help="Print the resolved config as YAML: every default filled, --set applied.")
@click.option("--schema", is_flag=True, help="Print the config's JSON Schema (for editors: completion and checks).")
@click.option("--reference", is_flag=True, help="Print the config reference (Markdown: every key, type, default).")
@config_option
@set_option
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write to this file instead of stdout.")
@click.pass_context
def config_command(
    ctx: click.Context,
    show: bool,
    schema: bool,
    reference: bool,
    config_path: str,
    overrides: tuple[str, ...],
    output: str | None,
) -> None:
    """Show the resolved config (--show, the default), its JSON Schema (--schema) or its reference (--reference).

    Imports no torch, and reads no data: the config file alone."""
    from kdpipe import configdoc

    if show + schema + reference > 1:
        raise UsageError("give one of --show, --schema or --reference")
    config_given = ctx.get_parameter_source("config_path") is not click.core.ParameterSource.DEFAULT
    if (schema or reference) and (overrides or config_given):
        raise UsageError("-c and --set go with --show; --schema and --reference describe every config")
    if schema:
        text = configdoc.schema_text()
    elif reference:
        text = configdoc.reference_markdown()
    else:
        from kdpipe.config import load_config

        cfg = load_config(config_path, overrides)
        text = configdoc.show_yaml(cfg.config, " ".join([cfg.source, *(f"--set {o}" for o in overrides)]))
    if output:
        from kdpipe.fileio import atomic_write_text

        atomic_write_text(Path(output), text)
    else:
        click.echo(text, nl=False)


@cli.command()
@config_option
@set_option
@click.option("--per-class", required=True, type=click.IntRange(min=1), help="Synthetic images per class (N).")
@click.option("-o", "--output", type=click.Path(), help="New folder (<class>/<n>.png); default: data.transfer_set.")
@click.option(
    "--iterations", default=2000, show_default=True, type=click.IntRange(min=0),
    help="Distribution-matching steps, a fresh random ConvNet each (the paper: 20,000); 0 keeps the random real "
    "images the set starts from (the baseline of the same size and seed).",
)  # fmt: skip
@click.option("--lr", default=1.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Learning rate of the synthetic pixels (SGD, momentum 0.5; normalised units).")  # fmt: skip
@click.option("--real-batch", default=128, show_default=True, type=click.IntRange(min=1),
              help="Real images per class per step (the paper: 256).")  # fmt: skip
@click.option("--width", default=32, show_default=True, type=click.IntRange(min=1),
              help="Channels of the random ConvNets (the paper: 128; 3 blocks up to 32 px).")  # fmt: skip
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="Seed of the starting images, the ConvNets and the augmentation.")  # fmt: skip
@click.option("--no-dsa", is_flag=True, help="Match without differentiable siamese augmentation.")
@click.option("--force", is_flag=True, help="Replace FOLDER if it exists (once the new set is complete).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def condense(
    config_path: str,
    overrides: tuple[str, ...],
    per_class: int,
    output: str | None,
    iterations: int,
    lr: float,
    real_batch: int,
    width: int,
    seed: int,
    no_dsa: bool,
    force: bool,
    no_progress: bool,
) -> None:
    """Condense the config's training split into N images per class by distribution matching (DM with DSA), saved
    as an image folder with provenance; train on it with data.transfer_set: FOLDER."""
    from kdpipe.ml.data.condense import DMSettings, make_transfer_set

    settings = DMSettings(
        per_class=per_class, iterations=iterations, lr=lr, real_batch=real_batch, width=width, dsa=not no_dsa,
        seed=seed,
    )  # fmt: skip
    cfg = _load(config_path, overrides)
    if output is None and cfg.config.data.transfer_set is None:
        raise UsageError("kdpipe condense: give -o FOLDER (or set data.transfer_set in the config)")
    out = Path(output) if output else cfg.resolve(cfg.config.data.transfer_set or "")
    prov = make_transfer_set(cfg, out, settings, force, progress=not no_progress)
    loss = prov["loss"]
    trend = f", DM loss {loss['first']:.4g} → {loss['last']:.4g}" if iterations else " (random real images)"
    click.echo(f"condensed: {out} ({per_class} x {len(prov['classes'])} images{trend}, {prov['seconds']:.0f}s)")


model_option = click.option(
    "--model", "model_names", multiple=True, metavar="NAME", help="Only this model (repeatable; default: all exported)."
)


@cli.command()
@click.option("-o", "--output", required=True, type=click.Path(), help="A new folder, or a FILE.tar.gz.")
@config_option
@model_option
@click.option(
    "--tune-session/--no-tune-session",
    default=True,
    show_default=True,
    help="Tune the recommended model's ONNX Runtime session (threads, optimisation level, execution mode) here "
    "and ship it as MODEL.session.json, which the runner applies.",
)
def bundle(output: str, config_path: str, model_names: tuple[str, ...], tune_session: bool) -> None:
    """Write an edge bundle of the last run: ONNX files, samples, a numpy+onnxruntime runner and its spec."""
    from kdpipe.edge.bundle import make_bundle

    out = make_bundle(
        _load(config_path, (), ("output_dir",)), Path(output), list(model_names) or None, tune=tune_session
    )
    click.echo(f"bundle: {out}  (on the device: python3 runner.py spec.json --out results.json)")


@cli.command()
@click.option("--target", required=True, metavar="ssh://user@host[:port]|local", help="Where to benchmark.")
@config_option
@model_option
@click.option("--name", help="Key in report.json's `targets` (default: user@host:port, or 'local').")
@click.option("--remote-python", help="Python on the target that has numpy and onnxruntime (default: python3).")
@click.option("--timeout", default=600.0, show_default=True, help="Seconds allowed for each step on the target.")
def bench(
    target: str,
    config_path: str,
    model_names: tuple[str, ...],
    name: str | None,
    remote_python: str | None,
    timeout: float,
) -> None:
    """Benchmark the last run's ONNX models on another machine over ssh (or locally) and add them to report.json."""
    from kdpipe.edge.remote import bench_target, format_results

    cfg = _load(config_path, (), ("output_dir",))
    key, results = bench_target(cfg, target, list(model_names) or None, name, remote_python, timeout)
    click.echo(format_results(results))
    click.echo(f"report: {cfg.output_dir / 'report.json'} (targets.{key})")


LIBRARIES = r"(torch|torchvision|onnx|onnxruntime|onnxscript|timm|numpy|PIL|webdataset)(\.|$)"


def _quiet_library_warnings() -> None:
    """Libraries' deprecation and user warnings (torch.jit's, the unpickler's) are not kdpipe's output: without
    --verbose (or the user's own PYTHONWARNINGS) they stay out of the terminal, so that an error is one line."""
    import warnings

    if sys.warnoptions:
        return
    for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category)
    warnings.filterwarnings("ignore", module=LIBRARIES)


def _fullest() -> Path | None:
    """Of the folders this command writes, the one with the least free space (where a full disk would be)."""
    from kdpipe.diskspace import free_bytes

    known = [(free_bytes(p), p) for p in _LOADED.values()]
    known = [(free, p) for free, p in known if free is not None]
    return min(known, key=lambda fp: fp[0])[1] if known else None


def main(argv: list[str] | None = None) -> int:
    """Entry point: maps kdpipe's errors to one line and the exit-code contract."""
    from kdpipe.diskspace import as_disk_error

    verbose = any(a in ("-v", "--verbose") for a in (argv if argv is not None else sys.argv[1:]))
    if not verbose:
        _quiet_library_warnings()
    try:
        cli.main(args=argv, prog_name="kdpipe", standalone_mode=False)
    except KdpipeError as exc:
        if verbose:
            traceback.print_exc()
        # a stage that died of a full disk
        full = as_disk_error(exc, _fullest()) if exc.exit_code == 3 else None
        click.echo(f"kdpipe: error: {full or exc}", err=True)
        return full.exit_code if full else exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        click.echo(f"kdpipe: error: {exc.format_message()}", err=True)
        return 2
    except click.exceptions.Abort:
        click.echo("kdpipe: interrupted; a re-run resumes from the last completed epoch", err=True)
        return 130
    except KeyboardInterrupt:
        click.echo("kdpipe: interrupted; a re-run resumes from the last completed epoch", err=True)
        return 130
    except Exception as exc:
        if verbose:
            traceback.print_exc()
        full = as_disk_error(exc, _fullest())
        if full:
            click.echo(f"kdpipe: error: {full}", err=True)
            return full.exit_code
        if isinstance(exc, OSError) and exc.filename:  # a path given on the command line (-o, --junit, --md)
            click.echo(f"kdpipe: error: cannot use {exc.filename}: {exc.strerror or exc}", err=True)
            return 2
        click.echo(
            f"kdpipe: internal error: {type(exc).__name__}: {exc} (run with --verbose for the traceback)", err=True
        )
        return 3
    return 0


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":  # `python -m kdpipe.cli`, e.g. under `torchrun -m kdpipe.cli run`
    entry()
