"""The configuration reference (docs/configuration.md), rendered from the pydantic model tree.

The config models are the one source of every key, type, default, bound and description, so the
reference is generated from them (``appliance config-reference``) and a test fails when the
committed file no longer matches: the reference cannot drift from what ``check-config`` accepts.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import annotated_types as at
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from appliance.config import AppConfig
from appliance.dataset import DatasetSpec
from appliance.training.recipe import TrainRecipe

HEADER = """# Configuration reference

One YAML file configures the appliance (`configs/default.yaml` is the demo line). Unknown keys are
errors; `appliance check-config FILE` validates a file and names the key and line of each mistake.
Relative paths are taken from `state_dir`. Secrets (OPC UA passwords, API tokens) are never keys
here: they come from the environment or systemd credentials.

Generated from `appliance/config.py` by `appliance config-reference`; a test keeps the two equal.
"""

BOUNDS = ((at.Ge, "≥", "ge"), (at.Gt, ">", "gt"), (at.Le, "≤", "le"), (at.Lt, "<", "lt"))


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The config model a field holds (directly, optionally, or as list items), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        if (model := _model_in(arg)) is not None:
            return model
    return None


def _type(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:  # e.g. list items with bounds of their own
        return _type(args[0])
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        names = [_type(a) for a in args if a is not type(None)]
        return " or ".join(names) + (", optional" if type(None) in args else "")
    if origin is list:
        return "list of entries" if _model_in(args[0]) else f"list of {_type(args[0])}"
    if origin is dict:
        return f"mapping {_type(args[0])} → {_type(args[1])}"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    if annotation is Path:
        return "path"
    return getattr(annotation, "__name__", str(annotation))


def _default(field: FieldInfo) -> str:
    extra = field.json_schema_extra
    if isinstance(extra, dict) and "shown_default" in extra:  # a default read from the environment
        return str(extra["shown_default"])
    if field.default is not PydanticUndefined:
        value = field.default
    elif field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
        if isinstance(value, BaseModel):
            return "–"
    else:
        return "**required**"
    if value is None:
        return "–"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, (dict, list)) and not value:
        return "empty"
    return f"`{value}`"


def _bounds(field: FieldInfo) -> str:
    """``1 ≤ x ≤ 1024``, ``0 < x``, ``length 1–64``: the limits pydantic enforces."""
    low = high = ""
    lengths: dict[str, int] = {}
    for item in field.metadata:
        if isinstance(item, (at.Ge, at.Gt)):
            low = f"{item.ge} ≤ " if isinstance(item, at.Ge) else f"{item.gt} < "
        elif isinstance(item, (at.Le, at.Lt)):
            high = f" ≤ {item.le}" if isinstance(item, at.Le) else f" < {item.lt}"
        elif isinstance(item, at.MinLen) and item.min_length:
            lengths["min"] = item.min_length
        elif isinstance(item, at.MaxLen):
            lengths["max"] = item.max_length
    out = [f"{low}x{high}"] if low or high else []
    if lengths:
        unit = ("character", "characters") if field.annotation in (str, str | None) else ("entry", "entries")
        if len(lengths) == 2:
            out.append(f"{lengths['min']}–{lengths['max']} {unit[1]}")
        else:
            n = next(iter(lengths.values()))
            out.append(f"{'at least' if 'min' in lengths else 'at most'} {n} {unit[n != 1]}")
    return ", ".join(out)


def _section_note(field: FieldInfo, model: type[BaseModel]) -> str:
    """What an absent section means, where it is not simply the section's own defaults."""
    if field.default_factory is None:
        return ""
    built = field.default_factory()  # type: ignore[call-arg]
    try:
        plain = model()
    except ValidationError:  # a section with required keys has no defaults of its own
        return ""
    changed = [f"`{k}: {str(v).lower() if isinstance(v, bool) else v}`" for k, v in built.model_dump().items()
               if v != getattr(plain, k)]
    return f"Without this section: {', '.join(changed)}.\n\n" if changed else ""


def _sections(model: type[BaseModel], prefix: str, field: FieldInfo | None,
              title: str | None = None) -> Iterator[str]:
    rows, nested = [], []
    for name, info in model.model_fields.items():
        key = info.alias or name
        sub = _model_in(info.annotation)
        if sub is not None:
            many = typing.get_origin(info.annotation) is list
            nested.append((f"{prefix}{key}{'[]' if many else ''}", sub, info))
        what = (info.description or ("see below" if sub else "")).replace("|", r"\|")
        rows.append(f"| `{key}` | {_type(info.annotation)} | {_default(info)} | {_bounds(info)} | {what} |")
    title = title or (f"`{prefix.rstrip('.')}`" if prefix else "Top level")
    intro = ""
    if field is not None:
        intro = (field.description + "\n\n") if field.description else ""
        intro += _section_note(field, model)
    if model.__doc__ and model.__doc__ != BaseModel.__doc__ and model.__module__ == "appliance.config":
        intro += model.__doc__.strip() + "\n\n"
    yield (f"## {title}\n\n{intro}| key | type | default | allowed | what it does |\n"
           "|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
    for path, sub, info in nested:
        yield from _sections(sub, path + ".", info)


RECIPE = """
# Training recipe

How a model is trained: `appliance train --recipe FILE`, `appliance learning-curve --recipe FILE`,
`python -m bench.elpv --recipe FILE` and retraining (`registry.retrain_recipe`) read a YAML mapping
of these keys; unknown keys are errors, and an absent key keeps its default. The defaults are the
recipe tuned on ELPV; the recipe is recorded in every model card. Without `--recipe`,
`appliance train` searches candidate recipes within `--budget` and `--max-latency-ms` (README,
"Running a line on your own images"). Generated from `appliance/training/recipe.py`.
"""


DATASET = """
# Dataset description (dataset.yaml)

A dataset folder holds `labels.csv` (column `image`, one column per head, optional `split`) and,
optionally, `dataset.yaml` with these keys; without it the heads are the other columns and their
classes the sorted distinct values. Unknown keys are errors. A head graded `within` another, e.g.

```yaml
heads:
  - {name: defect_type, classes: [ok, scratch, stain, crack]}
  - {name: severity, classes: [none, minor, major, critical], ordinal: true, within: defect_type}
```

learns what makes a scratch major apart from what makes a stain major; the model still has one
`severity_probs` output, so the line, the disposition table and the PLC codes treat it as any other
head. Every class of `defect_type` needs training rows with a severity (label flawless parts
`none`). Generated from `appliance/dataset.py`.
"""


def render() -> str:
    """The whole reference, as Markdown."""
    return (HEADER + "\n" + "\n".join(_sections(AppConfig, "", None)) + RECIPE + "\n"
            + "\n".join(_sections(TrainRecipe, "", None, title="Recipe keys")) + DATASET + "\n"
            + "\n".join(_sections(DatasetSpec, "", None, title="Dataset keys")))
