"""YAML loading that remembers where each key came from, so validation errors can name the line."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError

from appliance.errors import UserError

Loc = tuple[str | int, ...]


def load_yaml_with_lines(path: Path) -> tuple[Any, dict[Loc, int]]:
    """Parse ``path``; return plain Python data and a map from key path to 1-based line number."""
    yaml = YAML(typ="rt")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror})") from exc
    try:
        doc = yaml.load(text)
    except MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise UserError(f"{where}: invalid YAML: {exc.problem}") from exc
    lines: dict[Loc, int] = {}
    return _plain(doc, (), lines), lines


def _plain(node: Any, loc: Loc, lines: dict[Loc, int]) -> Any:
    if isinstance(node, CommentedMap):
        out = {}
        for key, value in node.items():
            line, _col = node.lc.key(key)
            lines[(*loc, key)] = line + 1
            out[key] = _plain(value, (*loc, key), lines)
        return out
    if isinstance(node, CommentedSeq):
        items = []
        for i, value in enumerate(node):
            line, _col = node.lc.item(i)
            lines[(*loc, i)] = line + 1
            items.append(_plain(value, (*loc, i), lines))
        return items
    return node


def line_of(loc: Loc, lines: dict[Loc, int]) -> int | None:
    """The line of ``loc`` or of its nearest ancestor that appears in the file."""
    for n in range(len(loc), 0, -1):
        if loc[:n] in lines:
            return lines[loc[:n]]
    return None


def validation_message(path: Path, exc: ValidationError, lines: dict[Loc, int]) -> str:
    """One line per error: ``file:line: key.path: message``."""
    out = []
    for err in exc.errors(include_url=False):
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        key = ".".join(str(p) for p in loc) or "(top level)"
        line = line_of(loc, lines)
        where = f"{path}:{line}" if line else str(path)
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (not allowed here; check the spelling)"
        elif "input" in err and err["type"] not in ("missing",) and not isinstance(err["input"], dict | list):
            msg = f"{msg} (got {err['input']!r})"
        out.append(f"{where}: {key}: {msg}")
    return "\n".join(out)


M = TypeVar("M", bound=BaseModel)


def load_validated(path: Path, model: type[M]) -> M:
    """A YAML file as ``model`` (an empty file gives its defaults); errors name the key and line."""
    data, lines = load_yaml_with_lines(path)
    try:
        return model.model_validate(data or {})
    except ValidationError as exc:
        raise UserError(validation_message(path, exc, lines)) from exc
