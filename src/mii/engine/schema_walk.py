"""Walking a JSON schema: which of its values are schemas.

The values of ``const``, ``enum``, ``default`` and ``examples`` are JSON values,
not schemas (a value may look like one); the values of ``properties``,
``patternProperties``, ``$defs`` and ``definitions`` are schemas whatever their
names (a property may be called ``default`` or ``enum``).
"""

from __future__ import annotations

from collections.abc import Iterator
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
