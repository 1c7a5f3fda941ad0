"""Command-line options derived from the fields of pydantic models.

Each option is named after its field (``max_new_tokens`` -> ``--max-new-tokens``),
takes its type and choices from the field's annotation, and its help from the
field's ``description``, followed by the field's default. Options left out on
the command line are None, so that the model's own defaults apply.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

# Options of these types show this placeholder for their value, unless told otherwise.
_METAVAR_BY_TYPE = {int: "N"}


def add_field_options(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    model: type[BaseModel],
    names: Iterable[str],
    defaults: Mapping[str, Any] | None = None,
    metavars: Mapping[str, str] | None = None,
    flags: Mapping[str, tuple[str, ...]] | None = None,
    multiple: Iterable[str] = (),
    parsers: Mapping[str, Callable[[str], Any]] | None = None,
) -> None:
    """One ``--option`` per field of ``model`` in ``names``. ``defaults`` replaces a
    field's default on this command line (it is then always given); a boolean
    defaulting to True, or to None (the engine chooses), gets a ``--no-`` form.
    ``flags``: a field's option strings instead of ``--field-name`` (the first is
    shown in help; the others are aliases, e.g. vLLM's names). ``multiple``: list
    fields that take one or more space-separated values instead of one
    comma-separated value. ``parsers``: a field's parser instead of its annotation's."""
    defaults, metavars, flags = defaults or {}, metavars or {}, flags or {}
    parsers = parsers or {}
    for name in names:
        field = model.model_fields[name]
        kind = _option_kind(field.annotation)
        if name in multiple:
            kind = {"nargs": "+", "type": typing.get_args(_without_none(field.annotation))[0]}
        if name in parsers:
            kind = {"type": parsers[name]}
        default = defaults.get(name, field.default)
        if kind.get("action") == "store_true" and (default is True or default is None):
            # on by default, or chosen by the engine when unset (None): --NAME and --no-NAME
            kind = {"action": argparse.BooleanOptionalAction}
        metavar = metavars.get(name, _METAVAR_BY_TYPE.get(kind.get("type")))
        if metavar and "choices" not in kind and kind.get("action") in (None, "append"):
            kind["metavar"] = metavar
        parser.add_argument(
            *flags.get(name, ("--" + name.replace("_", "-"),)),
            dest=name,
            default=defaults.get(name),
            help=_help(field, defaults.get(name, field.default), name in multiple),
            **kind,
        )


def given_options(args: argparse.Namespace, names: Iterable[str]) -> dict[str, Any]:
    """The options of ``names`` that have a value (given, or defaulted on this command line)."""
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def _option_kind(annotation: Any) -> dict[str, Any]:
    """argparse's ``type``/``choices``/``action`` for a field's annotation."""
    kind = _without_none(annotation)
    origin = typing.get_origin(kind)
    if kind is bool:
        return {"action": "store_true"}
    if origin is Literal:
        return {"choices": list(typing.get_args(kind))}
    if origin is tuple:  # tuple[str, ...]: the option is repeatable
        return {"action": "append", "type": typing.get_args(kind)[0]}
    if origin is list:  # list[int]: comma-separated values
        return {"type": _comma_separated(typing.get_args(kind)[0])}
    if origin is dict:  # dict[int, float]: comma-separated KEY=VALUE pairs
        return {"type": _key_values(*typing.get_args(kind))}
    return {"type": kind}


def _without_none(annotation: Any) -> Any:
    """``X`` for ``X | None``, else the annotation itself."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _comma_separated(item: type) -> Callable[[str], list]:
    def parse(text: str) -> list:
        return [item(x) for x in text.split(",")]

    parse.__name__ = f"comma-separated {item.__name__}"  # named in argparse's errors
    return parse


def _key_values(key: type, value: Any) -> Callable[[str], dict]:
    """KEY=VALUE,... as a dict; a value of ``float | str`` is a number when it reads
    as one, else the text."""
    kinds = typing.get_args(value) or (value,)

    def scalar(text: str) -> Any:
        for kind in kinds[:-1]:
            with contextlib.suppress(ValueError):
                return kind(text)
        return kinds[-1](text)

    def parse(text: str) -> dict:
        pairs = (item.split("=", 1) for item in text.split(","))
        return {key(k): scalar(v) for k, v in pairs}

    names = "|".join(kind.__name__ for kind in kinds)
    parse.__name__ = f"comma-separated {key.__name__}={names}"  # for argparse's errors
    return parse


def _help(field: FieldInfo, default: Any, multiple: bool = False) -> str:
    """The field's description and ``default``, unless the description names its own
    default (which a default of this command line replaces)."""
    text = field.description or ""
    if default is not field.default:
        text = re.sub(r"\s*\(default: [^)]*\)$", "", text)
    if typing.get_origin(_without_none(field.annotation)) is list and not multiple:
        text = f"comma-separated {text}"
    if typing.get_origin(_without_none(field.annotation)) is dict:
        text = f"comma-separated KEY=VALUE: {text}"
    shown_default = not (default is None or default is False or default == ())
    if shown_default and default is not PydanticUndefined and "(default:" not in text:
        shown = f"{default:g}" if isinstance(default, float) else default
        text = f"{text} (default: {shown})"
    return text.replace("%", "%%")  # argparse formats help with %
