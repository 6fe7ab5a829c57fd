"""Environment settings plumbing shared by every stage's ``settings.py``.

A stage declares one ``pydantic_settings.BaseSettings`` subclass whose field
names are the lower-case environment variable names, each with a type, a
default, bounds and a ``description``. From that single declaration come:

* validation of everything at once (:func:`load_settings`), reported as one
  line per bad variable naming the value and what is allowed;
* the ``--help`` text (:func:`settings_help`) and the README tables
  (:func:`settings_markdown`), so nothing is written twice.
"""

from __future__ import annotations

import os
import typing
from pathlib import Path
from typing import Annotated, Any, Iterable, TypeVar

from pydantic import BeforeValidator, SecretStr, ValidationError
from pydantic_settings import BaseSettings, NoDecode

from loraship.errors import UserError

S = TypeVar("S", bound=BaseSettings)


def _split_commas(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


#: A list given in the environment as ``a,b,c`` (not JSON).
CommaList = Annotated[list[str], NoDecode, BeforeValidator(_split_commas)]


def _empty_to_none(value: Any) -> Any:
    if isinstance(value, str) and value.strip() == "":
        return None
    return value


#: An optional value where an empty variable (``HUB_REPO=``) means "not set".
EmptyIsNone = BeforeValidator(_empty_to_none)


class SettingsError(UserError):
    """One or more settings are invalid; ``problems`` holds one line each."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


def env_name(field: str) -> str:
    return field.upper()


def _secret_fields(cls: type[BaseSettings]) -> set[str]:
    secret = set()
    for name, info in cls.model_fields.items():
        ann = info.annotation
        args = typing.get_args(ann) or (ann,)
        if ann is SecretStr or SecretStr in args:
            secret.add(name)
    return secret


def format_validation_error(cls: type[BaseSettings], err: ValidationError) -> list[str]:
    """One line per problem: ``VAR='value': what is wrong``; secrets never echoed."""
    secrets = _secret_fields(cls)
    lines = []
    for problem in err.errors():
        loc = [str(p) for p in problem.get("loc", ()) if not isinstance(p, int)]
        field = loc[0] if loc else ""
        var = env_name(field) if field else "settings"
        message = problem.get("msg", "invalid").removeprefix("Value error, ")
        if field in secrets or problem.get("type") == "missing" or not loc:
            shown = ""
        else:
            value = problem.get("input")
            shown = f"={value!r}" if not isinstance(value, (dict, list)) else ""
        lines.append(f"{var}{shown}: {message}")
    return lines


def load_settings(cls: type[S], env_files: Iterable[str | os.PathLike] = (), **overrides: Any) -> S:
    """Read ``cls`` from the environment (and ``env_files``, later ones winning).

    The environment itself always wins over any file. All problems are
    collected and raised together as :class:`SettingsError`.
    """
    files = tuple(str(f) for f in env_files if Path(f).is_file())
    try:
        return cls(_env_file=files or None, **overrides)  # type: ignore[call-arg]
    except ValidationError as err:
        raise SettingsError(format_validation_error(cls, err)) from None


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " | ".join(str(a) for a in typing.get_args(annotation))
    if origin is Annotated:
        return _type_name(typing.get_args(annotation)[0])
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        parts = [_type_name(a) for a in typing.get_args(annotation) if a is not type(None)]
        return " | ".join(parts)
    if origin is list:
        return "comma list"
    if annotation is SecretStr:
        return "secret"
    return getattr(annotation, "__name__", str(annotation))


def _default_text(info: Any) -> str:
    if info.is_required():
        return "(required)"
    default = info.get_default(call_default_factory=True)
    if default is None:
        return "(unset)"
    if isinstance(default, SecretStr):
        return "(unset)"
    if isinstance(default, list):
        return ",".join(str(d) for d in default)
    if isinstance(default, bool):
        return str(default).lower()
    return str(default)


def settings_rows(cls: type[BaseSettings]) -> list[tuple[str, str, str, str]]:
    """``(VARIABLE, type, default, description)`` for every field, in order."""
    rows = []
    for name, info in cls.model_fields.items():
        rows.append((env_name(name), _type_name(info.annotation), _default_text(info), info.description or ""))
    return rows


def settings_help(cls: type[BaseSettings]) -> str:
    """Plain-text table for ``--help`` (click: keep it inside a ``\\b`` block)."""
    lines = ["Settings (environment variables, or a .env file):", ""]
    for var, typ, default, desc in settings_rows(cls):
        lines.append(f"  {var}  [{typ}; default: {default}]")
        lines.append(f"      {desc}")
    return "\n".join(lines)


def settings_markdown(cls: type[BaseSettings]) -> str:
    """The same table as markdown, for the README."""
    out = ["| variable | type | default | meaning |", "|---|---|---|---|"]
    for var, typ, default, desc in settings_rows(cls):
        # A choice's "a | b" would split the cell: markdown reads an escaped pipe as a character.
        typ, desc = typ.replace("|", "\\|"), desc.replace("|", "\\|")
        out.append(f"| `{var}` | {typ} | `{default}` | {desc} |")
    return "\n".join(out)


def public_settings(settings: BaseSettings) -> dict[str, Any]:
    """The settings as plain JSON-able values, secrets removed (for manifests and logs)."""
    from loraship.manifest import redact

    secrets = _secret_fields(type(settings))
    data = {}
    for name in type(settings).model_fields:
        if name in secrets:
            continue
        value = getattr(settings, name)
        if isinstance(value, Path):
            value = str(value)
        data[env_name(name)] = value
    return redact(data)
