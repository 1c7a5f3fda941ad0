"""A small seeded generator of JSON schemas for the structured-output tests.

Every schema bounds its output (strings by ``maxLength``, arrays by ``maxItems``,
nesting by depth), so that a random-weight model that follows the grammar
finishes within a modest token budget.
"""

from __future__ import annotations

import random
from typing import Any

WORDS = ["red", "green", "blue", "cat", "dog", "a b", "x"]


def _leaf(rng: random.Random) -> dict[str, Any]:
    kind = rng.choice(["integer", "integer", "number", "string", "enum", "boolean", "const"])
    if kind == "integer":
        low = rng.randint(-50, 50)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 500)}
    if kind == "number":
        low = rng.randint(-10, 10)
        return {"type": "number", "minimum": low, "maximum": low + rng.randint(1, 100)}
    if kind == "string":
        schema: dict[str, Any] = {"type": "string", "maxLength": rng.randint(1, 6)}
        if rng.random() < 0.3:
            schema["minLength"] = 1
        return schema
    if kind == "enum":
        return {"enum": rng.sample(WORDS, rng.randint(1, 4))}
    if kind == "const":
        return {"const": rng.choice(WORDS)}
    return {"type": "boolean"}


def _node(rng: random.Random, depth: int) -> dict[str, Any]:
    if depth >= 2 or rng.random() < 0.4:
        return _leaf(rng)
    if rng.random() < 0.4:
        return {
            "type": "array",
            "items": _node(rng, depth + 2),  # arrays of leaves
            "minItems": rng.randint(0, 1),
            "maxItems": rng.randint(1, 3),
        }
    return _object(rng, depth + 1)


def _object(rng: random.Random, depth: int) -> dict[str, Any]:
    keys = ["id", "name", "size", "tags", "ok", "kind", "items", "meta"]
    names = rng.sample(keys, rng.randint(1, 4 - depth))
    properties = {name: _node(rng, depth) for name in names}
    # at least one required, so that the object is never just "{}"
    required = [n for n in names if rng.random() < 0.6] or names[:1]
    return {"type": "object", "properties": properties, "required": required}


def generate_schemas(count: int, seed: int = 0) -> list[dict[str, Any]]:
    """``count`` schemas, the same ones for the same seed (top level: an object)."""
    rng = random.Random(seed)
    return [_object(rng, 0) for _ in range(count)]
