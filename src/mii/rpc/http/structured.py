"""Structured output on the OpenAI routes: the request fields that constrain the answer.

Each becomes one of mii's constraint options (``mii.constraint_options``):

- OpenAI's ``response_format``: ``{"type": "text"}`` (nothing),
  ``{"type": "json_object"}`` -> ``json_object``, and ``{"type": "json_schema",
  "json_schema": {"name": ..., "schema": {...}, "strict": ...}}`` -> ``json_schema``
  (the schema is enforced whatever ``strict`` says; without a ``schema``, any JSON
  object). On chat and on completions (vLLM takes it on both).
- vLLM's ``guided_json``, ``guided_regex``, ``guided_choice``, ``guided_grammar``
  and its newer ``structured_outputs`` object (``json``, ``regex``, ``choice``,
  ``grammar``, ``json_object``) -> ``json_schema``, ``regex``, ``choice``,
  ``grammar``, ``json_object``.

A request may set one of them; a bad shape is a 400 naming the field. Whether the
schema, regex or grammar compiles is decided by the engine, whose error names
the mii option; :func:`structured_field_names` maps it back to the field the
request used.
"""

from __future__ import annotations

import json
from typing import Any

from mii.rpc.http.errors import ApiError

# vLLM's guided_* fields -> mii's options
_GUIDED = {
    "guided_json": "json_schema",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
}
# structured_outputs' keys -> mii's options
_STRUCTURED_OUTPUTS = {
    "json": "json_schema",
    "regex": "regex",
    "choice": "choice",
    "grammar": "grammar",
    "json_object": "json_object",
}
# vLLM's structured_outputs keys that tune its own backends: accepted, no effect here.
# (disable_additional_properties: a schema's objects get only the properties it names
# unless its additionalProperties allows more, which is what that key asks for.)
_STRUCTURED_OUTPUTS_IGNORED = (
    "disable_fallback",
    "disable_any_whitespace",
    "whitespace_pattern",
    "disable_additional_properties",
)


def _response_format(value: dict[str, Any]) -> tuple[str, Any] | None:
    kind = value.get("type")
    if kind not in ("text", "json_object", "json_schema"):
        # (no type was read as text: a constraint the user meant, dropped)
        raise ApiError(
            400,
            f"response_format type {kind!r} is not supported; use 'text', 'json_object' or "
            "'json_schema'",
            "response_format.type",
        )
    allowed = {"type", "json_schema"} if kind == "json_schema" else {"type"}
    extra = sorted(set(value) - allowed)
    if extra:  # e.g. {"type": "json_object", "schema": ...}: the schema was dropped
        raise ApiError(
            400,
            f"response_format of type {kind!r} takes no {extra[0]!r}; a schema goes in "
            '{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}',
            f"response_format.{extra[0]}",
        )
    if kind == "text":
        return None
    if kind == "json_object":
        return "json_object", True
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise ApiError(
            400,
            "response_format of type 'json_schema' needs a 'json_schema' object "
            '({"name": ..., "schema": {...}})',
            "response_format.json_schema",
        )
    unknown = sorted(set(spec) - {"name", "description", "schema", "strict"})
    if unknown:  # ("Schema", "json_schema" twice: the schema was dropped, a user trial)
        raise ApiError(
            400,
            f"unknown field {unknown[0]!r} in response_format.json_schema; it takes name, "
            "description, schema and strict",
            f"response_format.json_schema.{unknown[0]}",
        )
    check_schema_spec_types(spec, "response_format.json_schema")
    schema = spec.get("schema")
    if schema is None:  # OpenAI lets it out: any JSON object
        return "json_object", True
    return "json_schema", schema


def check_schema_spec_types(spec: dict[str, Any], where: str) -> None:
    """A 400 naming ``where.KEY`` when a JSON-schema format's ``name`` or
    ``description`` is no string or its ``strict`` no true/false (the chat route's
    ``response_format.json_schema``, the Responses route's ``text.format``)."""
    for key, kind_of, words in (
        ("name", str, "a string"),
        ("description", str, "a string"),
        ("strict", bool, "true or false"),
    ):
        if spec.get(key) is not None and not isinstance(spec[key], kind_of):
            raise ApiError(400, f"{where}.{key} must be {words}", f"{where}.{key}")


def _given(body: Any) -> list[tuple[str, str, Any]]:
    """(request field, mii option, value) of every constraint the request sets."""
    given = []
    response_format = getattr(body, "response_format", None)
    if response_format is not None:
        found = _response_format(response_format)
        if found is not None:
            given.append(("response_format", *found))
    for field, option in _GUIDED.items():
        value = getattr(body, field, None)
        if value is not None:
            given.append((field, option, value))
    outputs = getattr(body, "structured_outputs", None)
    if outputs is not None:
        for key, value in outputs.items():
            if key in _STRUCTURED_OUTPUTS_IGNORED or value is None:
                continue
            if key not in _STRUCTURED_OUTPUTS:
                raise ApiError(
                    400,
                    f"unknown structured_outputs field {key!r}; use one of "
                    f"{', '.join(_STRUCTURED_OUTPUTS)}",
                    f"structured_outputs.{key}",
                )
            if key == "json_object" and value is False:
                continue
            given.append((f"structured_outputs.{key}", _STRUCTURED_OUTPUTS[key], value))
    return given


def structured_options(body: Any) -> dict[str, Any]:
    """mii's constraint option for the request (empty: none). 400 naming the fields
    when it sets more than one."""
    given = _given(body)
    if len(given) > 1:
        fields = ", ".join(field for field, _, _ in given)
        raise ApiError(
            400,
            f"at most one structured-output constraint per request (got {fields}); keep one",
            given[1][0],
        )
    options = {option: value for _, option, value in given}
    schema = options.get("json_schema")
    if schema is not None and not isinstance(schema, str):  # the message carries its text
        try:
            options["json_schema"] = json.dumps(schema, ensure_ascii=False)
        except (TypeError, ValueError):
            raise ApiError(400, "the JSON schema is not JSON-serialisable", given[0][0]) from None
    return options


def structured_field_names(body: Any) -> dict[str, str]:
    """mii's option name -> the request field that set it (for error messages)."""
    try:
        return {option: field for field, option, _ in _given(body)}
    except ApiError:
        return {}
