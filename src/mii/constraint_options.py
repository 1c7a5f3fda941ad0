"""Structured-output options: constrain what a request may generate.

``json_schema``, ``regex``, ``choice``, ``grammar`` and ``json_object`` are
generation options like any other (``GenerateParams`` inherits them); at most
one of them per request. The engine compiles the constraint into a grammar with
xgrammar (``mii.engine.constraints``) and masks, at each step, the tokens that
would break it. Only the shape of the values is checked here; whether a schema,
regular expression or grammar compiles is checked when the request is queued,
where the tokenizer is known, and fails naming the field just the same.
"""

from __future__ import annotations

import json
from functools import cached_property
from typing import Any

from pydantic import BaseModel, Field, field_validator, model_validator

# The constraint options, in the order errors name them.
CONSTRAINT_FIELDS = ("json_schema", "regex", "choice", "grammar", "json_object")
# Bounds on a constraint's text: compiling is linear-ish in its size, and it runs
# on the server; larger ones are almost certainly mistakes.
MAX_CONSTRAINT_CHARS = 256 * 1024
MAX_CHOICES = 1024


class ConstraintOptions(BaseModel):
    """The structured-output options of one request (all off by default)."""

    json_schema: str | None = Field(
        default=None,
        description="generate JSON that validates against this JSON schema (a dict, a pydantic "
        "model class, or its JSON text); the text keeps the schema's property order",
    )
    regex: str | None = Field(
        default=None,
        description="generate text that matches this regular expression (whole match)",
    )
    choice: tuple[str, ...] | None = Field(
        default=None,
        description="generate exactly one of these strings (repeatable)",
    )
    grammar: str | None = Field(
        default=None,
        description="generate text of this context-free grammar, in xgrammar's EBNF "
        "(GBNF, as llama.cpp's: rules `name ::= ...`, the start rule named `root`)",
    )
    json_object: bool = Field(
        default=False,
        description="generate one JSON object (any keys), as OpenAI's "
        'response_format {"type": "json_object"}',
    )

    @field_validator("json_schema", mode="before")
    @classmethod
    def _schema_as_json_text(cls, value: Any) -> Any:
        # A pydantic model class: its schema, as OpenAI's SDK does for .parse().
        if isinstance(value, type) and issubclass(value, BaseModel):
            value = value.model_json_schema()
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as err:
                raise ValueError(f"is not valid JSON ({err})") from None
        if isinstance(value, bool):  # true / false are JSON schemas (anything / nothing)
            raise ValueError("must be a JSON schema object, not a boolean")
        if not isinstance(value, dict) and value is not None:
            raise ValueError("must be a JSON schema object (a dict or its JSON text)")
        if value is None:
            return None
        try:
            # One canonical text (the key of the grammar cache), property order kept:
            # the generated JSON follows it.
            return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
        except (TypeError, ValueError) as err:
            raise ValueError(f"is not JSON-serialisable ({err})") from None

    @field_validator("choice", mode="before")
    @classmethod
    def _choice_as_tuple(cls, value: Any) -> Any:
        if isinstance(value, str):
            raise ValueError("must be a list of strings (one string: use a one-element list)")
        return value

    @field_validator("json_schema", "regex", "grammar")
    @classmethod
    def _bounded_text(cls, value: str | None) -> str | None:
        if value is not None:
            if not value.strip():
                raise ValueError("must not be empty")
            if len(value) > MAX_CONSTRAINT_CHARS:
                raise ValueError(f"must be at most {MAX_CONSTRAINT_CHARS} characters")
        return value

    @field_validator("choice")
    @classmethod
    def _choices_bounded(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("must list at least one string")
        if len(value) > MAX_CHOICES:
            raise ValueError(f"at most {MAX_CHOICES} choices ({len(value)} given)")
        if sum(len(c) for c in value) > MAX_CONSTRAINT_CHARS:
            raise ValueError(f"the choices must total at most {MAX_CONSTRAINT_CHARS} characters")
        return value

    @model_validator(mode="after")
    def _one_constraint(self) -> ConstraintOptions:
        given = [name for name in CONSTRAINT_FIELDS if getattr(self, name) not in (None, False)]
        if len(given) > 1:
            raise ValueError(
                f"at most one constraint per request: {', '.join(given)} were all given; "
                "keep one of them"
            )
        return self

    @cached_property
    def constraint(self) -> tuple[str, str] | None:
        """(kind, spec) of this request's constraint, or None: the grammar cache's
        key (with the tokenizer). ``choice`` is a JSON list of its strings."""
        for name in ("json_schema", "regex", "grammar"):
            value = getattr(self, name)
            if value is not None:
                return name, value
        if self.choice is not None:
            return "choice", json.dumps(list(self.choice), ensure_ascii=False)
        if self.json_object:
            return "json_object", ""
        return None
