"""Walking a JSON schema: which of its values are schemas.

The values of ``const``, ``enum``, ``default`` and ``examples`` are JSON values,
not schemas (a value may look like one); the values of ``properties``,
``patternProperties``, ``$defs`` and ``definitions`` are schemas whatever their
names (a property may be called ``default`` or ``enum``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

LITERAL_KEYWORDS = frozenset(("const", "enum", "default", "examples"))
SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")


def schema_objects(node: Any, path: str = "#") -> Iterator[tuple[str, dict]]:
    """Every schema object in ``node`` with its JSON-pointer path (values of the
    literal keywords left out)."""
    if isinstance(node, list):
        for i, item in enumerate(node):
            yield from schema_objects(item, f"{path}/{i}")
        return
    if not isinstance(node, dict):
        return
    yield path, node
    for key, value in node.items():
        if key in SCHEMA_MAPS and isinstance(value, dict):
            for name, sub in value.items():
                yield from schema_objects(sub, f"{path}/{key}/{name}")
        elif key not in LITERAL_KEYWORDS:
            yield from schema_objects(value, f"{path}/{key}")


def rebuilt(node: Any, transform: Callable[[dict, str], Any], path: str = "#") -> Any:
    """A copy of ``node`` in which each schema object, its own schemas rebuilt first,
    is replaced by ``transform(object, path)`` (values of the literal keywords kept)."""
    if isinstance(node, list):
        return [rebuilt(item, transform, f"{path}/{i}") for i, item in enumerate(node)]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {n: rebuilt(sub, transform, f"{path}/{key}/{n}") for n, sub in value.items()}
        else:
            out[key] = (
                value if key in LITERAL_KEYWORDS else rebuilt(value, transform, f"{path}/{key}")
            )
    return transform(out, path)


# Drafts before 2020-12 (as "$schema" names them), where a list of ``items`` is a tuple.
_EARLIER_DRAFTS = ("draft-03", "draft-04", "draft-06", "draft-07", "2019-09")


def names_an_earlier_draft(schema: Any) -> bool:
    """True when ``schema``'s ``$schema`` names a draft before 2020-12."""
    name = schema.get("$schema") if isinstance(schema, dict) else None
    return isinstance(name, str) and any(draft in name for draft in _EARLIER_DRAFTS)


def in_2020_12_terms(out: dict, path: str = "#") -> dict:
    """One schema object with the earlier drafts' forms in 2020-12's: a tuple
    (``items`` list + ``additionalItems``) as ``prefixItems`` + ``items``, and
    draft-04's boolean ``exclusiveMinimum`` / ``exclusiveMaximum`` as the bound itself.
    (A transform for :func:`rebuilt`: it changes ``out`` in place.)"""
    for bound, exclusive in (("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")):
        flag = out.get(exclusive)
        if isinstance(flag, bool):
            del out[exclusive]
            if flag and bound in out:
                out[exclusive] = out.pop(bound)
    if isinstance(out.get("items"), list):
        out["prefixItems"] = out.pop("items")
        out["items"] = out.pop("additionalItems", {})
    return out
