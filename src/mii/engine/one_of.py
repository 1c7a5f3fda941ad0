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
from collections.abc import Iterator
from typing import Any

_LITERAL_KEYWORDS = frozenset(("const", "enum", "default", "examples"))
_MAX_DEPTH = 8  # how deep a discriminator may sit (objects inside objects)


def overlapping_one_of(schema: Any) -> str | None:
    """The first ``oneOf`` in ``schema`` whose branches are not provably exclusive,
    described with its JSON-pointer path; None when there is none."""
    for path, node in _schemas_in(schema, "#"):
        branches = node.get("oneOf")
        if not isinstance(branches, list):
            continue
        for i in range(len(branches)):
            for j in range(i + 1, len(branches)):
                if not _exclusive(branches[i], branches[j], schema, 0):
                    return (
                        f"'oneOf' (at {path}) whose branches {i} and {j} can match the same "
                        "value is not supported: the grammar engine enforces it as 'anyOf', "
                        "so an answer could match both; use 'anyOf', or make the branches "
                        "exclusive (different types, or a property each requires with a "
                        "different 'const')"
                    )
    return None


def _schemas_in(node: Any, path: str) -> Iterator[tuple[str, dict]]:
    """Every object in ``node`` with its JSON-pointer path, but inside the values of
    ``const``/``enum``/``default``/``examples`` (values, not schemas)."""
    items = enumerate(node) if isinstance(node, list) else None
    if isinstance(node, dict):
        yield path, node
        items = ((k, v) for k, v in node.items() if k not in _LITERAL_KEYWORDS)
    for key, value in items or ():
        yield from _schemas_in(value, f"{path}/{key}")


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


def _exclusive(a: Any, b: Any, root: Any, depth: int) -> bool:
    """Whether no value can match both schemas ``a`` and ``b`` (False: not proven)."""
    a, b = _resolved(a, root), _resolved(b, root)
    if not isinstance(a, dict) or not isinstance(b, dict) or depth > _MAX_DEPTH:
        return False
    values_a, values_b = _values(a), _values(b)
    if values_a is not None and values_b is not None and not values_a & values_b:
        return True
    types_a, types_b = _types(a), _types(b)
    if types_a is not None and types_b is not None and not types_a & types_b:
        return True
    required = set(a.get("required") or ()) & set(b.get("required") or ())
    properties_a, properties_b = a.get("properties") or {}, b.get("properties") or {}
    return any(
        name in properties_a
        and name in properties_b
        and _exclusive(properties_a[name], properties_b[name], root, depth + 1)
        for name in required
    )


def _values(schema: dict) -> set[str] | None:
    """The values ``schema`` lists (``const``, ``enum``) as canonical JSON, or None."""
    if "const" in schema:
        listed = [schema["const"]]
    elif isinstance(schema.get("enum"), list):
        listed = schema["enum"]
    else:
        return None
    return {json.dumps(value, sort_keys=True) for value in listed}


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
