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
