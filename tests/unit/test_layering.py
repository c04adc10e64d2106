"""The architecture, checked: one `kdpipe` namespace, imports point down, no cycles.

Layers, bottom up (docs/architecture.md):
  0  kdpipe.version, errors, fileio, registry, config, cache,  the ground floor
     teachers (the shipped teachers' manifest), launch (torchrun's environment)
     configdoc (the generated config reference and JSON Schema)
  1  kdpipe.ml, kdpipe.reporting, kdpipe.edge, kdpipe.exporters  the toolkits
     kdpipe.ml in rooms, bottom up: runtime, data, models, train (ML_ROOMS)
  2  kdpipe.stages                                             one file per stage
  3  kdpipe.runner, kdpipe.cli, kdpipe (the package API)         the top floor
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

import kdpipe

ROOT = Path(__file__).resolve().parents[2]
PACKAGE_DIRS = {"kdpipe": "pipeline", "kdpipe.stages": "stages", "kdpipe.exporters": "exporters"}
GROUND = {
    "kdpipe.version", "kdpipe.errors", "kdpipe.fileio", "kdpipe.registry", "kdpipe.config", "kdpipe.cache",
    "kdpipe.yamlfile", "kdpipe.lock", "kdpipe.diskspace", "kdpipe.teachers", "kdpipe.launch",
    "kdpipe.configdoc",
}  # fmt: skip
TOP = {"kdpipe", "kdpipe.runner", "kdpipe.cli", "kdpipe.__main__", "kdpipe.preflight"}
ML_ROOMS = ["runtime", "data", "models", "train"]  # bottom up: a room imports only itself and the rooms below


def _modules() -> dict[str, Path]:
    """Every kdpipe module and its source file, from the folders pyproject maps into the namespace."""
    out: dict[str, Path] = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([package, *parts])
            if (name.startswith("kdpipe.stages") and package == "kdpipe") or (
                name.startswith("kdpipe.exporters") and (package == "kdpipe")
            ):
                continue
            out[name] = path
    return out


MODULES = _modules()


def layer(module: str) -> int:
    if module in TOP:
        return 3
    if module in GROUND:
        return 0
    if module.startswith("kdpipe.stages"):
        return 2
    if module.split(".")[1] in {"ml", "reporting", "edge", "exporters"}:
        return 1
    raise AssertionError(f"{module} is in no layer: add it to tests/unit/test_layering.py and docs/architecture.md")


def imports_of(module: str, path: Path) -> set[str]:
    """kdpipe modules named by this file's import statements (top level and inside functions alike)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found |= {f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES}
    return {name for name in found if name in MODULES and name != module}


GRAPH = {m: imports_of(m, p) for m, p in MODULES.items()}


def test_every_module_has_a_layer_and_a_package() -> None:
    packages = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    for module, path in MODULES.items():
        layer(module)
        if path.name == "__init__.py":
            assert module in packages, f"{module} is missing from [tool.setuptools] packages in pyproject.toml"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module: str) -> None:
    for target in GRAPH[module]:
        assert layer(target) <= layer(module), (
            f"{module} (layer {layer(module)}) imports {target} (layer {layer(target)})"
        )
        if module.startswith("kdpipe.stages"):
            assert target not in {"kdpipe.runner", "kdpipe.cache"}, f"stage module {module} imports {target}"


def ml_room(module: str) -> int:
    parts = module.split(".")
    assert len(parts) >= 4 and parts[2] in ML_ROOMS, (
        f"{module} lies outside kdpipe.ml's rooms {ML_ROOMS}: move it into one (docs/architecture.md)"
    )
    return ML_ROOMS.index(parts[2])


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("kdpipe.ml.") and m.count(".") >= 3))
def test_ml_rooms_import_only_downwards(module: str) -> None:
    for target in GRAPH[module]:
        if target.startswith("kdpipe.ml.") and target.count(".") >= 3:
            assert ml_room(target) <= ml_room(module), (
                f"{module} (kdpipe.ml.{ML_ROOMS[ml_room(module)]}) imports {target} "
                f"(kdpipe.ml.{ML_ROOMS[ml_room(target)]}): rooms import only downwards, {' < '.join(ML_ROOMS)}"
            )


def test_ml_has_only_rooms() -> None:
    loose = [m for m in MODULES if m.startswith("kdpipe.ml.") and m.count(".") == 2 and m.split(".")[2] not in ML_ROOMS]
    assert not loose, f"modules directly in kdpipe.ml: {loose}; put each in one of its rooms {ML_ROOMS}"


def test_no_import_cycles() -> None:
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(GRAPH[node]):
            if nxt == "kdpipe":  # the package API imports lazily; every `kdpipe.x` import runs its __init__ first
                continue
            if state.get(nxt) == 1:
                cycle = [*trail[trail.index(nxt) :], nxt] if nxt in trail else [node, nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if not state.get(nxt):
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for module in sorted(GRAPH):
        if not state.get(module):
            visit(module, [module])


def test_every_module_imports_in_a_fresh_interpreter() -> None:
    code = (
        "import importlib, json, sys\n"
        "bad = {}\n"
        "for name in json.loads(sys.argv[1]):\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as exc:\n"
        "        bad[name] = repr(exc)\n"
        "print(json.dumps(bad))\n"
    )
    names = sorted(m for m in MODULES if m != "kdpipe.__main__")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(names)], capture_output=True, text=True, cwd="/")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {}


def test_one_namespace_no_generic_top_level_packages() -> None:
    assert Path(kdpipe.__file__).resolve().parent == ROOT / "pipeline"
    code = "import importlib.util as u; print([n for n in ('pipeline', 'stages', 'exporters') if u.find_spec(n)])"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_light_modules_import_no_torch() -> None:
    code = (
        "import sys, kdpipe.cli, kdpipe.config, kdpipe.runner, kdpipe.stages\n"
        "print(sorted(m for m in ('torch', 'onnxruntime', 'onnx') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert proc.stdout.strip() == "[]", proc.stdout + proc.stderr
