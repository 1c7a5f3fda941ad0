"""What every OpenAI request body's fields share: JSON's types read as a client means them.

- ``null`` is "not set": a field with a default that is not null takes it
  (OpenAI's clients and proxies send unset options as null, and OpenAI's
  specification allows null for ``n``, ``stream``, ``echo``, ...); a field where
  null means something keeps it; a required field stays refused.
- A boolean is never a number (pydantic reads ``true`` as 1: ``"max_tokens": true``
  is a mistake; so are ``"stop_token_ids": [true]`` and ``"logit_bias": {"5": true}``),
  and a true/false field takes only true or false (pydantic reads
  ``"yes"``, ``"off"`` and 1 as booleans: ``"stream": "yes"`` is a mistake too).
- Text is Unicode: JSON lets a lone surrogate (``"\\ud800"``) through, which no
  tokenizer reads and no answer can echo (``metadata`` or ``user`` holding one
  failed the Responses API's answer with a 500 after generating it: a user trial);
  and no field nests deeper than :data:`MAX_NESTING` levels.
"""

from __future__ import annotations

import typing
from typing import Any

from pydantic import BaseModel, ValidationInfo, field_validator


def _takes_booleans(annotation: Any) -> bool:
    return annotation is bool or bool in typing.get_args(annotation)


def _takes_none(annotation: Any) -> bool:
    """Whether null is a value of its own for the field (``max_tokens: null``: no limit)."""
    args = typing.get_args(annotation)
    return annotation is None or type(None) in args or None in args  # (None: Literal's)


def _only_booleans(annotation: Any) -> bool:
    """``bool`` or ``bool | None``: a field whose value is true or false."""
    return annotation is bool or set(typing.get_args(annotation)) == {bool, type(None)}


def _holds_booleans(value: Any) -> bool:
    """Whether a list's items or a dict's values include a boolean."""
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return any(isinstance(item, bool) for item in items)


def _holds_numbers(annotation: Any) -> bool:
    """Whether a field is a list or dict of numbers (``list[int]``, ``dict[str, float]``,
    optional or not): token ids and biases."""
    for kind in (annotation, *typing.get_args(annotation)):
        origin, args = typing.get_origin(kind), typing.get_args(kind)
        if origin in (list, dict) and args and args[-1] in (int, float):
            return True
    return False


# Deeper than this, a field is refused: an answer that echoes it (the Responses
# API's metadata) failed to render at ~950 levels, a 500 after generating (a trial).
MAX_NESTING = 256


def _text_problem(value: Any, path: str) -> str | None:
    """What is wrong with the text of ``value`` (a JSON value; keys too): a lone
    surrogate (with where), or a nesting deeper than MAX_NESTING; None when nothing.
    (A loop, not a recursion: a body nested as deep as the JSON parser takes must not
    exhaust the stack here.)"""
    pending = [(value, path, 0)]
    while pending:
        value, path, depth = pending.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as err:
                return f"is not valid Unicode: a lone surrogate at {path} (position {err.start})"
        elif depth >= MAX_NESTING and isinstance(value, (dict, list)):
            return f"nests deeper than {MAX_NESTING} levels"
        elif isinstance(value, dict):
            for key, item in reversed(value.items()):
                pending.append((item, f"{path}.{key}", depth + 1))
                pending.append((key, f"a key of {path}", depth + 1))
        elif isinstance(value, list):
            pending.extend(
                (item, f"{path}.{at}", depth + 1) for at, item in reversed(list(enumerate(value)))
            )
    return None


class RequestFields(BaseModel):
    # A base of the request models. No docstring: it would change the served /openapi.json.

    @field_validator("*", mode="before")
    @classmethod
    def _as_the_client_means(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        if field is None:
            return value
        problem = _text_problem(value, info.field_name or "")
        if problem:
            raise ValueError(problem)
        if value is None and not field.is_required() and not _takes_none(field.annotation):
            return field.get_default(call_default_factory=True)
        if isinstance(value, bool) and not _takes_booleans(field.annotation):
            raise ValueError("must not be a boolean")
        if _holds_booleans(value) and _holds_numbers(field.annotation):
            # (token ids and biases: pydantic reads [true] as [1], {"5": true} as 1.0)
            raise ValueError("holds true or false where a number belongs")
        if _only_booleans(field.annotation) and value is not None and not isinstance(value, bool):
            raise ValueError("must be true or false")
        return value
