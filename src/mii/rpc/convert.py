"""Conversions between mii's Python objects and the protobuf messages."""

from __future__ import annotations

from typing import Any

from mii.config import GenerateParams
from mii.errors import InvalidRequestError
from mii.response import Response
from mii.rpc import mii_pb2

_SCALAR_OPTIONS = [name for name in GenerateParams.model_fields if name != "stop"]


def options_to_proto(params: dict[str, Any]) -> mii_pb2.GenerationOptions:
    """Generation options (already validated) as a typed message."""
    options = mii_pb2.GenerationOptions()
    for name, value in params.items():
        if value is None:
            continue
        if name == "stop":
            options.stop.extend([value] if isinstance(value, str) else list(value))
        else:
            setattr(options, name, value)
    return options


def options_from_proto(options: mii_pb2.GenerationOptions) -> dict[str, Any]:
    """Only the options the sender set, so engine defaults apply to the rest."""
    params: dict[str, Any] = {
        name: getattr(options, name) for name in _SCALAR_OPTIONS if options.HasField(name)
    }
    if options.stop:
        params["stop"] = list(options.stop)
    return params


def piece_to_proto(response: Response) -> mii_pb2.Piece:
    return mii_pb2.Piece(
        generated_text=response.generated_text,
        prompt_length=response.prompt_length,
        generated_length=response.generated_length,
        finish_reason=response.finish_reason or "",
        token_ids=response.token_ids,
    )


def piece_from_proto(piece: mii_pb2.Piece) -> Response:
    return Response(
        generated_text=piece.generated_text,
        prompt_length=piece.prompt_length,
        generated_length=piece.generated_length,
        finish_reason=piece.finish_reason or None,
        token_ids=list(piece.token_ids),
    )


def validated(params: dict[str, Any]) -> dict[str, Any]:
    """The options the sender set, checked and converted to their declared types
    (JSON's ``"10"`` or ``10.0`` for an integer field becomes ``10``), so that
    mistakes fail before any network call and the message can be built."""
    parsed = GenerateParams.parse(**params)
    return {name: getattr(parsed, name) for name in params}


def generate_request(prompts: list[str], params: dict[str, Any]) -> mii_pb2.GenerateRequest:
    """The request message for ``prompts`` with (validated) options. A prompt that
    is not valid Unicode (a lone surrogate) is refused naming ``prompt``, rather than
    failing in the protobuf encoder."""
    for prompt in prompts:
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as err:
            raise InvalidRequestError(
                f"the prompt is not valid Unicode ({err.reason} at position {err.start})",
                field="prompt",
            ) from None
    return mii_pb2.GenerateRequest(prompts=prompts, options=options_to_proto(params))
