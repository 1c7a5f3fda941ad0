"""``oneOf`` whose branches may overlap: refused, as xgrammar enforces it as ``anyOf``.

JSON Schema's ``oneOf`` asks a value to match exactly one branch. xgrammar (0.2.x)
generates a value of any branch, so where two branches share values an answer
could match both and break the schema (a user trial: ``{"a": 1, "b": false}``
valid under each of two object branches). A ``oneOf`` is accepted when its
branches are exclusive by construction, which this module proves pairwise:
different types, disjoint ``const``/``enum`` values, or a property that both
require with exclusive schemas (a discriminator, as pydantic writes tagged unions:
``{"kind": {"const": "cat"}}``). Anything else is refused with its path.
"""

from __future__ import annotations

import json
from typing import Any

from mii.engine.schema_walk import rebuilt, schema_objects

_MAX_DEPTH = 8  # how deep a discriminator may sit (objects inside objects)
# Pairwise proofs beyond this many branches would take seconds (all-const/enum
# branches are checked in one pass whatever their number).
MAX_PROVED_BRANCHES = 256
_ALL_TYPES = frozenset(("object", "array", "string", "number", "integer", "boolean", "null"))


def overlapping_one_of(schema: Any) -> str | None:
    """The first ``oneOf`` in ``schema`` whose branches are not provably exclusive,
    described with its JSON-pointer path; None when there is none."""
    for path, node in schema_objects(schema):
        branches = node.get("oneOf")
        if not isinstance(branches, list) or not all(isinstance(b, (dict, bool)) for b in branches):
            continue  # (not a schema's oneOf: a value that looks like one)
        pair = _overlapping_pair(branches, _discriminator(node), schema)
        if pair == "too many":
            return (
                f"'oneOf' (at {path}) of {len(branches)} branches is not supported: mii proves "
                f"its branches exclusive (the grammar engine enforces 'anyOf') for at most "
                f"{MAX_PROVED_BRANCHES} unless each lists its values (const/enum); use 'anyOf'"
            )
        if pair is not None:
            i, j = pair
            return (
                f"'oneOf' (at {path}) whose branches {i} and {j} can match the same "
                "value is not supported: the grammar engine enforces it as 'anyOf', "
                "so an answer could match both; use 'anyOf', or make the branches "
                "exclusive (different types, or a property each requires with a "
                "different 'const')"
            )
    return None


def _discriminator(node: dict) -> str | None:
    """The property an OpenAPI ``discriminator`` (pydantic's tagged unions) names."""
    found = node.get("discriminator")
    name = found.get("propertyName") if isinstance(found, dict) else None
    return name if isinstance(name, str) else None


def _overlapping_pair(branches: list, tag: str | None, root: Any) -> Any:
    """A pair of branch indexes not proved exclusive, "too many", or None."""
    resolved = [_resolved(b, root) for b in branches]
    listed = [_values(b) if isinstance(b, dict) else None for b in resolved]  # (True: None)
    if all(values is not None for values in listed):  # one pass: any value in two?
        seen: dict[str, int] = {}
        for j, values in enumerate(listed):
            for value in values:
                if value in seen:
                    return seen[value], j
                seen[value] = j
        return None
    if len(branches) > MAX_PROVED_BRANCHES:
        return "too many"
    for i in range(len(branches)):
        for j in range(i + 1, len(branches)):
            if not _exclusive(resolved[i], resolved[j], root, 0, tag):
                return i, j
    return None


def _resolved(node: Any, root: Any) -> Any:
    """``node`` with a ``$ref`` to a JSON pointer inside ``root`` followed (a few times)."""
    for _ in range(_MAX_DEPTH):
        ref = node.get("$ref") if isinstance(node, dict) else None
        if not isinstance(ref, str) or not ref.startswith("#"):
            return node
        target: Any = root
        for part in ref[1:].split("/")[1:]:
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(target, dict) and part in target:
                target = target[part]
            else:
                return None  # (unresolvable: proves nothing)
        node = target
    return node


def _exclusive(a: Any, b: Any, root: Any, depth: int, tag: str | None = None) -> bool:
    """Whether no answer of one of the schemas ``a``, ``b`` matches the other
    (False: not proven). ``tag``: a discriminator property, read as required."""
    a, b = _resolved(a, root), _resolved(b, root)
    if a is False or b is False:  # (the schema false matches nothing; true everything)
        return True
    if not isinstance(a, dict) or not isinstance(b, dict) or depth > _MAX_DEPTH:
        return False
    values_a, values_b = _values(a), _values(b)
    if values_a is not None and values_b is not None and not values_a & values_b:
        return True
    types_a, types_b = _types(a), _types(b)
    if types_a is not None and types_b is not None and not types_a & types_b:
        return True
    # A property both require tells objects apart only: what else either generates
    # (an untyped schema is generated as an object) must not match the other.
    made_a, made_b = types_a or {"object"}, types_b or {"object"}
    if (made_a & (types_b or _ALL_TYPES)) - {"object"} or (made_b & (types_a or _ALL_TYPES)) - {
        "object"
    }:
        return False
    required = _names(a.get("required")) & _names(b.get("required"))
    properties_a, properties_b = a.get("properties"), b.get("properties")
    if not isinstance(properties_a, dict) or not isinstance(properties_b, dict):
        return False
    if tag is not None:  # (pydantic's tag with a default is not required; xgrammar may
        required.add(tag)  # leave it out, as it did before: the tag's values still differ)
    return any(
        name in properties_a
        and name in properties_b
        and _exclusive(properties_a[name], properties_b[name], root, depth + 1)
        for name in required
    )


def _names(required: Any) -> set[str]:
    """A ``required`` list's names (draft-03's ``required: true`` names none)."""
    return {n for n in required if isinstance(n, str)} if isinstance(required, list) else set()


def _values(schema: dict) -> set[str] | None:
    """The values ``schema`` lists (``const``, ``enum``) as canonical JSON, or None."""
    if "const" in schema:
        listed = [schema["const"]]
    elif isinstance(schema.get("enum"), list):
        listed = schema["enum"]
    else:
        return None
    return {json.dumps(_same_number(value), sort_keys=True) for value in listed}


def _same_number(value: Any) -> Any:
    """``value`` with each whole float as its integer (JSON Schema: 1.0 equals 1, and
    -0.0 equals 0), so that equal values compare equal."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_same_number(item) for item in value]
    if isinstance(value, dict):
        return {key: _same_number(item) for key, item in value.items()}
    return value


def _types(schema: dict) -> set[str] | None:
    """The JSON types a schema's values may have (an integer is also a number), or
    None when it does not say."""
    kind = schema.get("type")
    if isinstance(kind, str):
        kinds = {kind}
    elif isinstance(kind, list) and all(isinstance(k, str) for k in kind):
        kinds = set(kind)
    elif _values(schema) is not None:
        listed = [schema["const"]] if "const" in schema else schema["enum"]
        kinds = {_json_type(value) for value in listed}
    else:
        return None
    if "number" in kinds or "integer" in kinds:  # integers are numbers: they overlap
        kinds |= {"number", "integer"}
    return kinds


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if value is None:
        return "null"
    return "array" if isinstance(value, list) else "object"


def with_required_tags(schema: Any) -> Any:
    """``schema`` with the discriminator of each tagged ``oneOf`` (an OpenAPI
    ``discriminator``, as pydantic writes ``Field(discriminator=...)``) required in
    each branch: a tag with a default is not required, so the grammar left it out
    and the answer matched no branch alone (``{"v": 2}``: a user trial). A branch
    that is a ``$ref`` becomes a copy of its target with the tag required."""

    def required_tags(node: dict, path: str = "") -> dict:
        tag = _discriminator(node)
        if tag is not None and isinstance(node.get("oneOf"), list):
            node["oneOf"] = [tagged(branch, tag) for branch in node["oneOf"]]
        return node

    def tagged(branch: Any, tag: str) -> Any:
        target = _resolved(branch, schema)
        properties = target.get("properties") if isinstance(target, dict) else None
        if not isinstance(properties, dict) or tag not in properties:
            return branch
        copy = rebuilt(target, required_tags) if target is not branch else dict(branch)
        required = copy.get("required") if isinstance(copy.get("required"), list) else []
        copy["required"] = required if tag in required else [*required, tag]
        return copy

    return rebuilt(schema, required_tags)
