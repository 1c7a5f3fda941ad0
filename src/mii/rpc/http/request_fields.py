"""What every OpenAI request body's fields share: JSON's types read as a client means them.

- ``null`` is "not set": a field with a default that is not null takes it
  (OpenAI's clients and proxies send unset options as null, and OpenAI's
  specification allows null for ``n``, ``stream``, ``echo``, ...); a field where
  null means something keeps it; a required field stays refused.
- A boolean is never a number (pydantic reads ``true`` as 1: ``"max_tokens": true``
  is a mistake), and a true/false field takes only true or false (pydantic reads
  ``"yes"``, ``"off"`` and 1 as booleans: ``"stream": "yes"`` is a mistake too).
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


class RequestFields(BaseModel):
    # A base of the request models. No docstring: it would change the served /openapi.json.

    @field_validator("*", mode="before")
    @classmethod
    def _as_the_client_means(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        if field is None:
            return value
        if value is None and not field.is_required() and not _takes_none(field.annotation):
            return field.get_default(call_default_factory=True)
        if isinstance(value, bool) and not _takes_booleans(field.annotation):
            raise ValueError("must not be a boolean")
        if _only_booleans(field.annotation) and value is not None and not isinstance(value, bool):
            raise ValueError("must be true or false")
        return value
