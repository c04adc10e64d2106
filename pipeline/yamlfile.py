"""Strict YAML: ``yaml.safe_load`` that refuses what it would otherwise accept silently.

PyYAML keeps the last of two equal keys in a mapping and drops the other without a word; a config
whose ``epochs`` is given twice then trains with whichever came last. Here a duplicated key is an
error naming the key path and both lines. Bytes that are not UTF-8 and YAML syntax errors are one
line each, naming the file. Ground floor: imports nothing of kdpipe but its errors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from kdpipe.errors import ConfigError


def _check_duplicates(node: yaml.Node, path: list[str], source: str) -> None:
    """Walk a composed YAML node tree; raise on the first mapping that repeats a key."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                key = key_node.value
                if key != "<<":  # merge keys are YAML's own mechanism, not a repeated setting
                    line = key_node.start_mark.line + 1
                    if key in seen:
                        where = ".".join([*path, str(key)])
                        raise ConfigError(where, f"duplicated key (lines {seen[key]} and {line})", source)
                    seen[key] = line
                _check_duplicates(value_node, [*path, str(key)], source)
            else:
                _check_duplicates(value_node, path, source)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_duplicates(item, [*path[:-1], f"{path[-1]}[{i}]"] if path else [f"[{i}]"], source)


def loads(text: str, source: str) -> Any:
    """Parse YAML text strictly (safe tags only, no duplicated keys); errors are one-line ConfigErrors."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is None:
            return None
        _check_duplicates(node, [], source)
        loader = yaml.SafeLoader("")
        try:
            return loader.construct_document(node)
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or (str(exc).splitlines() or ["?"])[0]
        raise ConfigError("", f"{where}not valid YAML: {problem}", source) from None
    except RecursionError:
        raise ConfigError("", "not valid YAML: nested too deeply", source) from None


def read_text(path: Path, what: str = "config file") -> str:
    """A file's text, or one line saying why it cannot be read (missing, a folder, unreadable, not UTF-8)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError("", f"{what} {path} is a folder, not a file")
    if not path.exists():
        raise ConfigError("", f"{what} not found: {path}; pass one with -c FILE")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError("", f"cannot read {what} {path}: {exc.strerror or exc}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            "", f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); save it as UTF-8", path.name
        ) from None


def load_file(path: Path, what: str = "config file") -> Any:
    """Read and strictly parse a YAML file."""
    return loads(read_text(path, what), Path(path).name)
