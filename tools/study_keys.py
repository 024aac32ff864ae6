"""The README's study-file reference, generated from the schema: every table and key with its type, its default and
its description (the field's docstring in hpsearch.config).

    python tools/study_keys.py            # print the reference
    python tools/study_keys.py --write    # put it in README.md, between the study-keys markers
    python tools/study_keys.py --check    # exit 1 when README.md's reference is not the schema's (tests/config)
"""

from __future__ import annotations

import sys
import types
import typing
from typing import Any, Literal

import _generated
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from hpsearch.config import StudyConfig


def toml_value(value: Any) -> str:
    """A value as a study file writes it."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def type_text(annotation: Any) -> str:
    """What a key takes, as a user reads it: the choices of a Literal, `[low, high]` for a range."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return type_text(args[0])
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_text(a) for a in args if a is not type(None))
    if origin is Literal:
        return " \\| ".join(toml_value(a) for a in args)
    if origin is tuple:
        return f"[low, high] ({type_text(args[0])}s)"
    if origin is list:
        return f"list of {type_text(args[0])}"
    return {int: "integer", float: "number", str: "string", bool: "true/false"}.get(annotation, str(annotation))


def default_text(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    value = field.default_factory() if field.default_factory is not None else field.default  # type: ignore[call-arg]
    if value is None or value is PydanticUndefined:
        return "unset"
    return f"`{toml_value(value)}`"


def _one_line(text: str | None) -> str:
    return " ".join((text or "").split()).replace("|", "\\|")


def section(table: str, model: type[BaseModel]) -> list[str]:
    """A table's rows; a sub-table's keys (the scheduler branches of [space]) follow as dotted keys, valid TOML
    inside the table (`step.gamma = [0.1, 0.5]` under `[space]` is `gamma` under `[space.step]`)."""
    lines = [f"**`[{table}]`**", "", "| key | takes | default | what |", "|---|---|---|---|"]
    return lines + _rows(model)


def _rows(model: type[BaseModel], prefix: str = "", context: str = "") -> list[str]:
    rows, nested = [], []
    for name, field in model.model_fields.items():
        kind = field.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            nested.append((name, kind))
            continue
        what = f"{context}: {_one_line(field.description)}" if context else _one_line(field.description)
        rows.append(f"| `{prefix}{name}` | {type_text(kind)} | {default_text(field)} | {what} |")
    for name, sub_model in nested:
        rows += _rows(sub_model, f"{prefix}{name}.", _one_line(sub_model.__doc__))
    return rows


def reference() -> str:
    lines: list[str] = []
    for table, field in StudyConfig.model_fields.items():
        if field.exclude:
            continue  # not a table of the file (where it was read from)
        lines += [*section(table, field.annotation), ""]  # type: ignore[arg-type]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return _generated.main(argv, description=__doc__.splitlines()[0], name="study-keys", tool="study_keys.py",
                           path=_generated.ROOT / "README.md", render=reference)


if __name__ == "__main__":
    sys.exit(main())
