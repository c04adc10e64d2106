"""Cache keys chain through the stages: a change re-runs exactly what depends on it. No torch needed."""

import subprocess
import sys

from kdpipe.config import load_config
from kdpipe.runner import plan, why_stale


def keys(path, *overrides):
    return {s.stage: s.key for s in plan(load_config(path, list(overrides)))}


def test_keys_follow_dependencies(write_config):
    path = write_config()
    base = keys(path)
    assert keys(path) == base  # deterministic
    bench = keys(path, "benchmark.batch_sizes=[1, 8]")
    assert [s for s in base if bench[s] != base[s]] == ["benchmark"]
    epochs = keys(path, "distill.train.epochs=5")
    assert [s for s in base if epochs[s] != base[s]] == ["distill", "validate", "export", "benchmark"]
    teacher = keys(path, "teacher.train.lr=0.2")
    assert all(teacher[s] != base[s] for s in base)
    cached = keys(path, "features.enabled=true")
    assert [s for s in base if cached[s] != base[s]] == ["features", "distill", "validate", "export", "benchmark"]
    assert keys(path, "features.views=8") == base  # settings of a disabled stage do not matter
    assert keys(path, "distill.kd.temperature=2") == base  # KD is not trained: its settings do not matter
    kd = keys(path, "distill.compare=[kd]")
    assert keys(path, "distill.compare=[kd]", "distill.kd.temperature=2")["distill"] != kd["distill"]
    # SimKD's paper loss keeps the key it had before the simkd section existed; the short preset re-trains
    assert keys(path, "distill.simkd.preset=paper") == base
    assert keys(path, "distill.simkd.preset=short")["distill"] != base["distill"]
    parity = keys(path, "export.parity.samples=16")
    assert [s for s in base if parity[s] != base[s]] == ["export", "benchmark"]


def test_result_neutral_fields_stay_out_of_keys(write_config, tmp_path):
    path = write_config()
    base = keys(path)
    assert keys(path, "runtime.threads=2", "runtime.progress=true", "runtime.device=cpu", "runtime.amp=true") == base
    ddp = keys(path, "runtime.nproc=2")  # data-parallel training changes the global batch: training stages re-run
    assert [s for s in base if ddp[s] != base[s]] == [
        "teacher",
        "features",
        "distill",
        "validate",
        "export",
        "benchmark",
    ]
    assert keys(path, f"cache_dir={tmp_path / 'elsewhere'}", "output_dir=out2") == base


def test_stale_reasons(write_config):
    path = write_config()
    old = {s.stage: s.payload for s in plan(load_config(path))}
    new = {s.stage: s.payload for s in plan(load_config(path, ["distill.train.epochs=5"]))}
    assert why_stale(new["teacher"], old["teacher"]) == "not in the cache (removed or damaged)"
    assert why_stale(new["distill"], old["distill"]) == "distill.train.epochs 2 → 5"
    assert why_stale(new["validate"], old["validate"]) == "upstream distill changed"
    assert why_stale(new["teacher"], None) == "not in the cache"


def test_status_and_help_do_not_import_torch(write_config):
    path = write_config()
    code = (
        "import sys; from kdpipe.cli import main\n"
        f"assert main(['status', '-c', {str(path)!r}]) == 0\n"
        "assert main(['--help']) == 0\n"
        "heavy = [m for m in ('torch', 'onnxruntime', 'onnx') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "teacher    stale" in out.stdout and "not in the cache" in out.stdout


def test_settings_added_later_stay_out_of_keys_at_their_neutral_value(write_config):
    """Each setting listed in KEY_NEUTRAL defaults to its neutral value and is absent from the stage payloads
    there, so adding it left every existing cache entry valid; set to anything else, it enters the key."""
    from kdpipe.config import KEY_NEUTRAL, PipelineConfig

    defaults = PipelineConfig().model_dump(mode="json")
    steps = plan(load_config(write_config()))
    for section, settings in KEY_NEUTRAL.items():
        for path, neutral in settings.items():
            value = defaults[section]
            for part in path.split("."):
                value = value[part]
            assert value == neutral, f"{section}.{path} defaults to {value!r}, not its neutral {neutral!r}"
            for step in steps:
                held = step.payload["config"].get(section)
                for part in path.split(".")[:-1]:
                    held = (held or {}).get(part)
                assert path.split(".")[-1] not in (held or {}), f"{section}.{path} is in {step.stage}'s key"
