"""Which JSON schemas the grammar engine enforces as written.

xgrammar (0.2.x) compiles a JSON schema into a grammar, but drops some keywords
silently (``not``, ``minProperties``; ``pattern`` beside ``format``; everything
beside ``enum`` or ``$ref``; ``multipleOf`` on numbers) and reads others as it
pleases: its output would then break the very schema the request gave.
:func:`unsupported_schema_feature` names the first such keyword, so that the
request is refused (400, naming it) rather than answered with invalid JSON. Each
rule here was found by an acceptance sweep validating xgrammar's output.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from mii.engine.one_of import overlapping_one_of
from mii.engine.regex_groups import without_group_names
from mii.engine.regex_sets import check_reads_the_same
from mii.engine.schema_walk import SCHEMA_MAPS

# JSON-schema keywords xgrammar does not enforce (it would ignore them silently):
# refused, so that a schema's output always validates.
UNSUPPORTED_SCHEMA_KEYWORDS = (
    "contains",
    "minContains",
    "maxContains",
    "dependentRequired",
    "dependentSchemas",
    "dependencies",
    "maxProperties",
    "minProperties",
    "if",
    "then",
    "else",
    "not",
    "unevaluatedItems",
    "unevaluatedProperties",
    "$dynamicRef",
    "$recursiveRef",
)
# Regex constructs xgrammar's regex engine ignores (lookaround) or lacks (backreferences).
# Named backreferences too: Python's "(?P=name)", "\k<name>".
# Only after an even run of backslashes: the pattern a\\1 is "a", a backslash and "1".
UNSUPPORTED_REGEX = re.compile(r"(?<!\\)(?:\\\\)*(?:\(\?<?[=!]|\(\?P=|\\k<|\\[1-9])")


# Keywords that constrain a value: next to anyOf / oneOf, xgrammar drops them (others,
# annotations such as title, default or an OpenAPI discriminator, are no constraint).
_ASSERTIONS = frozenset(
    ("type", "properties", "required", "items", "prefixItems", "additionalProperties",
     "patternProperties", "enum", "const", "minimum", "maximum", "exclusiveMinimum",
     "exclusiveMaximum", "multipleOf", "minLength", "maxLength", "pattern", "format",
     "minItems", "maxItems", "$ref", "allOf", "anyOf", "oneOf")
)  # fmt: skip

# Keywords whose value is a map of names to schemas, or a list of schemas: walked,
# but their keys are names, not keywords.
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
# Keywords of one type that xgrammar (0.2.x) ignores in a schema without "type" (which
# it reads as any value), with that type; and what gives a schema its values instead.
_TYPED_ASSERTIONS = {
    "minItems": "array",
    "minLength": "string",
    "maxLength": "string",
    "pattern": "string",
    "format": "string",
    "minimum": "number",
    "maximum": "number",
    "exclusiveMinimum": "number",
    "exclusiveMaximum": "number",
    "multipleOf": "number",
}
_TYPE_GIVERS = ("enum", "const", "$ref", "anyOf", "oneOf", "allOf")


def schema_problem(schema: Any) -> str | None:
    """What in ``schema`` the grammar engine would not enforce (the first keyword,
    or a ``oneOf`` whose branches may overlap), with its path; None if nothing."""
    return unsupported_schema_feature(schema) or overlapping_one_of(schema)


def unsupported_schema_feature(schema: Any, path: str = "#") -> str | None:
    """A description of the first keyword in ``schema`` that xgrammar would not
    enforce (with its JSON-pointer path), or None."""
    if isinstance(schema, list):
        for i, item in enumerate(schema):
            found = unsupported_schema_feature(item, f"{path}/{i}")
            if found:
                return found
        return None
    if not isinstance(schema, dict):
        return None
    for key in UNSUPPORTED_SCHEMA_KEYWORDS:
        if key in schema:
            return f"the keyword {key!r} (at {path}) is not supported"
    if schema.get("uniqueItems") is True:
        return f"the keyword 'uniqueItems' (at {path}) is not supported"
    untyped = "type" not in schema and not any(k in schema for k in _TYPE_GIVERS)
    for key in _TYPED_ASSERTIONS if untyped else ():
        if key in schema:
            return (
                f"the keyword {key!r} (at {path}) has no 'type' beside it, where the "
                "grammar engine ignores it; add the type it constrains (e.g. 'type': "
                f"{_TYPED_ASSERTIONS[key]!r})"
            )
    ref = schema.get("$ref")
    # xgrammar fetches nothing, and reads an anchor ("#name") as any value
    if isinstance(ref, str) and not (ref == "#" or ref.startswith("#/")):
        return (
            f"the $ref {ref!r} (at {path}) is not supported: only JSON pointers inside "
            "the schema ('#/$defs/...') are; put the referenced schema under $defs"
        )
    pattern = schema.get("pattern")
    if isinstance(pattern, str) and UNSUPPORTED_REGEX.search(pattern):
        return f"the pattern at {path} uses lookaround or a backreference, which is not supported"
    if isinstance(pattern, str):
        try:  # (what xgrammar would read as something else than re and jsonschema do)
            # (strict: xgrammar wrote a pattern Python cannot read, "[\\e\"]", raw: a trial)
            check_reads_the_same(without_group_names(pattern), unparsed_ok=False)
        except ValueError as err:
            return f"the pattern at {path}: {err}"
    found = _ignored_combination(schema, path)
    if found:
        return found
    for key, value in schema.items():
        if key in SCHEMA_MAPS and isinstance(value, dict):
            for name, sub in value.items():
                found = unsupported_schema_feature(sub, f"{path}/{key}/{name}")
                if found:
                    return found
        elif key in _SCHEMA_LISTS or key in ("items", "additionalProperties", "propertyNames"):
            if key == "propertyNames" and isinstance(value, dict) and "type" not in value:
                # property names are strings: xgrammar enforces a pattern here untyped
                value = {"type": "string", **value}
            found = unsupported_schema_feature(value, f"{path}/{key}")
            if found:
                return found
    return None


def _ignored_combination(schema: dict, path: str) -> str | None:
    """Combinations of keywords that xgrammar (0.2.x) accepts but does not enforce
    (each output of these validated in an acceptance sweep: it ignored them)."""
    for key in ("anyOf", "oneOf"):
        others = sorted(k for k in schema if k != key and k in _ASSERTIONS)
        if key in schema and others:
            return (
                f"{key!r} next to {others[0]!r} (at {path}) is not supported: move "
                f"{others[0]!r} into each of the {key!r} schemas"
            )
    if isinstance(schema.get("allOf"), list) and len(schema["allOf"]) > 1:
        return f"'allOf' with more than one schema (at {path}) is not supported: merge them"
    found = _dropped_beside_values_or_ref(schema, path)
    if found:
        return found
    if "format" in schema and "pattern" in schema:  # the format is kept, the pattern dropped
        return (
            f"'format' together with 'pattern' (at {path}) is not supported: keep one "
            "(a pattern can spell out the format)"
        )
    # With a pattern xgrammar drops the length: refused, as the pattern can carry it.
    # With a format it drops the length too but enforces the format; let through (the
    # one gap, documented): pydantic writes every HttpUrl as a uri of 1-2,083 characters.
    if ("minLength" in schema or "maxLength" in schema) and "pattern" in schema:
        return (
            f"'minLength'/'maxLength' together with 'pattern' (at {path}) is not supported: "
            "put the length in the pattern, e.g. ^[a-z]{1,3}$"
        )
    step = schema.get("multipleOf")
    if isinstance(step, float) and not step.is_integer():
        return f"a fractional 'multipleOf' (at {path}) is not supported"
    kinds = schema.get("type")
    kinds = kinds if isinstance(kinds, list) else [kinds]
    integers = "integer" in kinds and set(kinds) <= {"integer", "null"}
    if step is not None and not integers:  # enforced on integers only (and null beside)
        return (
            f"'multipleOf' on a value that is not of type 'integer' (at {path}) is not "
            "supported: give it 'type': 'integer' (pydantic: an int field) or leave it out"
        )
    if kinds in (["integer"], ["number"]) and _no_number_between(schema, kinds == ["integer"]):
        bounds = ", ".join(f"'{key}' {schema[key]}" for key in _BOUNDS if key in schema)
        return f"no {kinds[0]} lies within {bounds} (at {path}): no value satisfies it"
    for low, high in (("minLength", "maxLength"), ("minItems", "maxItems"),
                      ("minimum", "maximum")):  # fmt: skip
        lo, hi = schema.get(low), schema.get(high)
        if isinstance(lo, int | float) and isinstance(hi, int | float) and lo > hi:
            return f"'{low}' {lo} above '{high}' {hi} (at {path}): no value satisfies it"
    required, properties = schema.get("required"), schema.get("properties", {})
    if isinstance(required, list) and isinstance(properties, dict):
        missing = [name for name in required if name not in properties]
        if missing:
            return (
                f"the required name {missing[0]!r} (at {path}) has no schema in 'properties', "
                "which is not supported: add one ({} for any value)"
            )
    return None


def _dropped_beside_values_or_ref(schema: dict, path: str) -> str | None:
    """Keywords xgrammar (0.2.x) drops beside ``enum`` / ``const`` (it generates any
    listed value, whatever the type or bounds beside it say) and beside ``$ref``
    (it generates the referenced schema alone)."""
    for key in ("enum", "const", "$ref"):
        if key not in schema:
            continue
        # (a type beside enum / const is kept when every listed value has it)
        others = sorted(k for k in schema if k in _ASSERTIONS and k not in (key, "type"))
        if key == "$ref" and "type" in schema:
            others = sorted([*others, "type"])
        if others:
            return (
                f"{others[0]!r} next to {key!r} (at {path}) is not supported: "
                + ("list only the values that satisfy it" if key != "$ref" else
                   "move it into the referenced schema")
            )  # fmt: skip
        kind = schema.get("type")
        values = schema["enum"] if key == "enum" else [schema.get(key)]
        if key != "$ref" and kind is not None and isinstance(values, list):
            wrong = next((v for v in values if not _has_json_type(v, kind)), _NONE)
            if wrong is not _NONE:
                return (
                    f"the {key!r} value {json.dumps(wrong)} (at {path}) is not of its 'type' "
                    f"{kind!r}: the grammar engine would generate it; drop the value or fix "
                    "the type"
                )
    return None


_NONE = object()
_JSON_TYPES = {
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "integer": lambda v: (
        (isinstance(v, int) and not isinstance(v, bool))
        or (isinstance(v, float) and v.is_integer())
    ),
}


def _has_json_type(value: Any, kind: Any) -> bool:
    """Whether JSON ``value`` is of the schema's ``type`` (a name or a list)."""
    kinds = kind if isinstance(kind, list) else [kind]
    return any(_JSON_TYPES.get(k, lambda v: True)(value) for k in kinds)


NESTED_TOO_DEEPLY = "is nested too deeply (hundreds of levels)"


def check_json_schema(schema: dict[str, Any]) -> None:
    """ValueError saying what is wrong when ``schema`` is not a valid JSON schema
    (by the meta-schema of the draft it names, else 2020-12): e.g. a negative
    ``maxLength`` or an empty ``type`` list, which the grammar engine would read
    as something else. Formats are not checked: a ``pattern`` is a regular
    expression of the grammar engine, not of Python's ``re``."""
    from jsonschema import exceptions, validators

    cls = validators.validator_for(schema)
    try:
        err = exceptions.best_match(cls(cls.META_SCHEMA).iter_errors(schema))
    except RecursionError:  # (the validator recurses once per level)
        raise ValueError(NESTED_TOO_DEEPLY) from None
    if err is not None:
        where = "/".join(str(p) for p in err.absolute_path)
        raise ValueError(
            f"is not a valid JSON schema: {err.message}" + (f" (at {where})" if where else "")
        )


_BOUNDS = ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum")


def _no_number_between(schema: dict[str, Any], integers: bool) -> bool:
    """True when a number schema's bounds leave no value (for integers: no whole
    number, ``[1.5, 1.7]``, which xgrammar refused with "Invalid range" and no path)."""
    given = {
        key: value
        for key in _BOUNDS
        if isinstance(value := schema.get(key), int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)  # (JSON's 1e400 reads as inf: xgrammar's error then)
    }
    for bound in ("minimum", "maximum"):  # draft-04: a true flag makes the bound exclusive
        exclusive = "exclusive" + bound.capitalize()
        if schema.get(exclusive) is True and bound in given:
            given[exclusive] = given.pop(bound)
    if integers:
        lows = [math.ceil(given[k]) for k in ("minimum",) if k in given]
        lows += [math.floor(given[k]) + 1 for k in ("exclusiveMinimum",) if k in given]
        highs = [math.floor(given[k]) for k in ("maximum",) if k in given]
        highs += [math.ceil(given[k]) - 1 for k in ("exclusiveMaximum",) if k in given]
        return bool(lows and highs) and max(lows) > min(highs)
    # (value, exclusive): the tighter of two equal bounds is the exclusive one
    low = max(((given[k], k.startswith("ex")) for k in _BOUNDS[:2] if k in given), default=None)
    high = min(((given[k], not k.startswith("ex")) for k in _BOUNDS[2:] if k in given),
               default=None)  # fmt: skip
    if low is None or high is None:
        return False
    return low[0] > high[0] or (low[0] == high[0] and (low[1] or not high[1]))
