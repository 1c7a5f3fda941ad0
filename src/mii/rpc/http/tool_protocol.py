"""The ``tools`` and ``tool_choice`` fields of a chat request, as pydantic models.

A tool is ``{"type": "function", "function": {"name", "description", "parameters",
"strict"}}``; its ``parameters`` must be a JSON schema (checked against the JSON
Schema meta-schema, so a bad one is a 400 naming
``tools.N.function.parameters``). ``tool_choice`` is ``"none"``, ``"auto"``,
``"required"`` or ``{"type": "function", "function": {"name": ...}}``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# No docstrings on these classes: they would change the served /openapi.json.


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=256)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _is_json_schema(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            check_json_schema(value)
        return value


class ChatTool(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


def check_json_schema(schema: dict[str, Any]) -> None:
    """ValueError saying what is wrong when ``schema`` is not a valid JSON schema
    (by the meta-schema of the draft it names, else 2020-12)."""
    from jsonschema import exceptions, validators

    try:
        validators.validator_for(schema).check_schema(schema)
    except exceptions.SchemaError as err:
        where = "/".join(str(p) for p in err.absolute_path)
        raise ValueError(
            f"is not a valid JSON schema: {err.message}" + (f" (at {where})" if where else "")
        ) from None
