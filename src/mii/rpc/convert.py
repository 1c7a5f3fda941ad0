"""Conversions between mii's Python objects and the protobuf messages."""

from __future__ import annotations

from typing import Any

from mii.config import GenerateParams
from mii.errors import InvalidRequestError
from mii.response import Response
from mii.rpc import mii_pb2

# Channel options for messages of any size (grpc's default caps what a channel
# receives at 4 MiB): replies can be larger than that (return_full_text).
UNLIMITED_MESSAGES = (
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_send_message_length", -1),
)

# Prompts per request: each is tokenized and queued on the replica's event loop,
# so a request of a million one-word prompts would stall every other request.
MAX_PROMPTS = 1024

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


def prompt_list(prompts: Any) -> list[str]:
    """``prompts`` (one string, or a list or tuple of at most MAX_PROMPTS strings)
    as a list; anything else (None, bytes, numbers, token ids, an empty or too
    long list) is InvalidRequestError naming ``prompts``."""
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise InvalidRequestError(
            f"prompts must be a string or a non-empty list of strings (got {_short_repr(prompts)})",
            field="prompts",
        )
    if len(prompts) > MAX_PROMPTS:
        raise InvalidRequestError(
            f"at most {MAX_PROMPTS} prompts per request (got {len(prompts)}); "
            "send them in several requests",
            field="prompts",
        )
    for prompt in prompts:
        if not isinstance(prompt, str):
            raise InvalidRequestError(
                f"every prompt must be a string (got {_short_repr(prompt)})", field="prompts"
            )
    return list(prompts)


def _short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_unicode(text: str, field: str, what: str) -> None:
    # protobuf strings are UTF-8: a lone surrogate would fail in the encoder.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise InvalidRequestError(
            f"{what} is not valid Unicode ({err.reason} at position {err.start})", field=field
        ) from None


def generate_request(prompts: list[str], params: dict[str, Any]) -> mii_pb2.GenerateRequest:
    """The request message for ``prompts`` with (validated) options. Prompts that
    are not a non-empty list of strings, and a prompt or stop string that is not
    valid Unicode (a lone surrogate), are refused naming the field, rather than
    failing in the protobuf encoder."""
    for prompt in prompt_list(prompts):
        _check_unicode(prompt, "prompt", "the prompt")
    stop = params.get("stop")
    for text in [stop] if isinstance(stop, str) else stop or ():
        _check_unicode(text, "stop", "a stop string")
    return mii_pb2.GenerateRequest(prompts=prompts, options=options_to_proto(params))
