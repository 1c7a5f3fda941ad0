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

from mii.engine.schema_support import check_json_schema
from mii.rpc.http.request_fields import RequestFields

# No docstrings on these classes: they would change the served /openapi.json.


class FunctionDefinition(RequestFields):
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
            kind = value.get("type", "object")
            if kind not in ("object", ["object"]):
                # (OpenAI refuses these too: the arguments were a bare string or list,
                # which LangChain's tool-call parsing then failed on)
                raise ValueError(
                    f"must be the JSON schema of an object (type 'object', not {kind!r}): "
                    "a tool's arguments are a JSON object; wrap the value in a property"
                )
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
