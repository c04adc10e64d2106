"""What the config schema says, for people and editors: the generated reference, the JSON Schema, the resolved config.

``kdpipe config --reference`` writes ``docs/config-reference.md`` and ``kdpipe config --schema`` writes
``docs/kdpipe.schema.json``, both from the pydantic models in :mod:`kdpipe.config`, so they cannot drift from
what is validated (a test regenerates both and compares). ``kdpipe config --show`` prints a loaded config with
every default filled in. Ground floor: imports only :mod:`kdpipe.config`, pydantic and PyYAML, never torch.
"""

from __future__ import annotations

import inspect
import json
import types
from collections.abc import Iterator
from typing import Any, Literal, Union, get_args, get_origin

import annotated_types
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from kdpipe.config import PipelineConfig

SCHEMA_FILE = "docs/kdpipe.schema.json"
REFERENCE_FILE = "docs/config-reference.md"
SCHEMA_COMMAND = f"kdpipe config --schema -o {SCHEMA_FILE}"
REFERENCE_COMMAND = f"kdpipe config --reference -o {REFERENCE_FILE}"
DIALECT = "https://json-schema.org/draft/2020-12/schema"  # what pydantic's GenerateJsonSchema emits


# ------------------------------------------------------------------------------------------ the walk
def _key(name: str, field: FieldInfo) -> str:
    return field.alias or name


def _models_in(annotation: Any) -> Iterator[tuple[type[BaseModel], str]]:
    """The config sections an annotation holds, each with the suffix its key path gets ('[]' inside a list)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation, ""
        return
    origin = get_origin(annotation)
    for arg in get_args(annotation):
        for model, suffix in _models_in(arg):
            yield model, ("[]" + suffix) if origin is list else suffix


def _sections(
    model: type[BaseModel], path: str = "", holder: FieldInfo | None = None
) -> Iterator[tuple[str, type[BaseModel], FieldInfo | None]]:
    """(key path, model, the field that holds it) for the model and every section below it, depth first."""
    yield path, model, holder
    for name, field in model.model_fields.items():
        for sub, suffix in _models_in(field.annotation):
            yield from _sections(sub, f"{path}.{_key(name, field)}{suffix}".lstrip("."), field)


# ------------------------------------------------------------------------------------- the reference
_SCALARS = {int: "integer", float: "number", bool: "boolean", str: "string", type(None): "null", Any: "any"}


def _type(annotation: Any) -> str:
    if annotation in _SCALARS:
        return _SCALARS[annotation]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping"
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return ("one of " if len(args) > 1 else "") + ", ".join(
            f"`{json.dumps(a) if not isinstance(a, str) else a}`" for a in args
        )
    if origin in (Union, types.UnionType):
        parts = [_type(a) for a in args if a is not type(None)]
        return " or ".join(parts + (["null"] if type(None) in args else []))
    if origin is list:
        return f"list of {_type(args[0])}s" if args else "list"
    if origin is tuple:
        return "[" + ", ".join(_type(a) for a in args) + "]"
    if origin is dict:
        return "mapping"
    return getattr(annotation, "__name__", str(annotation))


def _bounds(field: FieldInfo) -> str:
    marks = []
    for item in field.metadata:
        for attr, sign in (("gt", ">"), ("ge", "≥"), ("lt", "<"), ("le", "≤")):
            if isinstance(item, getattr(annotated_types, attr.capitalize())):
                marks.append(f"{sign} {getattr(item, attr)}")
    return f", {' and '.join(marks)}" if marks else ""


def _default_value(field: FieldInfo) -> Any:
    value = field.get_default(call_default_factory=True)
    return value.model_dump(mode="json", by_alias=True) if isinstance(value, BaseModel) else value


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    if any(True for _ in _models_in(field.annotation)) and isinstance(
        field.get_default(call_default_factory=True), BaseModel
    ):
        return "(its keys' defaults)"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, tuple):
        value = list(value)
    return f"`{json.dumps(value, ensure_ascii=False)}`" if not isinstance(value, str) else f"`{value}`"


def _anchor(path: str) -> str:
    """GitHub's anchor of a heading that is the key path in backticks."""
    return "".join(c for c in path.lower() if c.isalnum() or c in "-_")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def reference_markdown() -> str:
    """docs/config-reference.md: every key of the config with its type, default and description."""
    sections = list(_sections(PipelineConfig))
    lines = [
        "# Config reference",
        "",
        "<!-- Generated from pipeline/config.py: do not edit. Regenerate with",
        f"     {REFERENCE_COMMAND}   -->",
        "",
        "Every key of `pipeline.yaml`, generated from the schema kdpipe validates it with (`pipeline/config.py`, "
        "`kdpipe.config`), so it is never out of date: its key path, type, default and description. Every key is "
        "optional unless its default says *required*; an unknown key, a wrong type or a value out of range is a "
        "one-line error naming the key and the file (exit 2). Some rules span several keys (say, `data.dataset: "
        "filelist` needs `data.files`): those are checked too, and said in the same way. The guide to the config "
        "is [config.md](config.md); editors that read JSON Schema complete and check `pipeline.yaml` with "
        "[kdpipe.schema.json](kdpipe.schema.json); `kdpipe config --show` prints a config with every default "
        "filled in.",
        "",
        "Sections:",
        "",
    ]
    for path, _model, _holder in sections[1:]:
        depth = path.count(".")
        lines.append(f"{'  ' * depth}- [`{path}`](#{_anchor(path)})")
    for path, model, holder in sections:
        title = f"`{path}`" if path else "Top level"
        lines += ["", f"## {title}", ""]
        holder_type = holder.annotation if holder is not None else None
        about = [holder.description] if holder is not None and holder.description else []
        if model.__doc__ and model is not PipelineConfig:
            about.append(inspect.cleandoc(model.__doc__))
        if path.endswith("[]"):
            about.append(f"`{path[:-2]}` is a list; each of its items has the keys below.")
        others = [word for kind, word in ((str, "a string"), (type(None), "null")) if kind in get_args(holder_type)]
        if others:
            about.append(f"It may also be {' or '.join(others)}; as a mapping it has the keys below.")
        if about:
            lines += [" ".join(about), ""]
        lines += ["| key | type | default | description |", "|---|---|---|---|"]
        for name, field in model.model_fields.items():
            key = f"{path}.{_key(name, field)}" if path else _key(name, field)
            subs = [f"{key}{suffix}" for _m, suffix in _models_in(field.annotation)]
            key_cell = f"[`{key}`](#{_anchor(subs[0])})" if subs else f"`{key}`"
            lines.append(
                f"| {key_cell} | {_cell(_type(field.annotation) + _bounds(field))} | {_cell(_default(field))} "
                f"| {_cell(field.description or '')} |"
            )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------- the schema
def _close_objects(node: Any) -> None:
    """Every object with listed properties refuses others (pydantic says so for extra='forbid'; make sure)."""
    if isinstance(node, dict):
        if node.get("type") == "object" and "properties" in node:
            node.setdefault("additionalProperties", False)
        for value in node.values():
            _close_objects(value)
    elif isinstance(node, list):
        for value in node:
            _close_objects(value)


def json_schema() -> dict[str, Any]:
    """The config's JSON Schema (Draft 2020-12, as pydantic emits it), unknown keys refused at every level.

    Defaults made by a factory (lists, mappings) are added, so that editors show them like the others."""
    schema = PipelineConfig.model_json_schema(by_alias=True, mode="validation")
    defs = schema.get("$defs", {})
    for path, model, _holder in _sections(PipelineConfig):
        target = schema if not path else defs.get(model.__name__)
        if target is None:
            continue
        for name, field in model.model_fields.items():
            prop = target.get("properties", {}).get(_key(name, field))
            if (
                prop is None
                or "default" in prop
                or field.is_required()
                or any(True for _ in _models_in(field.annotation))
            ):
                continue
            value = _default_value(field)
            prop["default"] = list(value) if isinstance(value, tuple) else value
    _close_objects(schema)
    return {
        "$schema": DIALECT,
        "title": "kdpipe pipeline config",
        "description": f"kdpipe's pipeline.yaml (generated from kdpipe.config; the reference: {REFERENCE_FILE})",
        **{k: v for k, v in schema.items() if k not in ("title", "description")},
    }


def schema_text() -> str:
    return json.dumps(json_schema(), indent=2, ensure_ascii=False) + "\n"


# ------------------------------------------------------------------------------- the resolved config
def show_yaml(config: PipelineConfig, source: str) -> str:
    """The config as YAML with every default filled in; loading it gives the same config."""
    data = config.model_dump(mode="json", by_alias=True)
    body = yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=120, default_flow_style=False)
    return f"# kdpipe config --show: {source}, every default filled in\n{body}"
