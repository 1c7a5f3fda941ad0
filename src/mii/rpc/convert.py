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
        queue_time_s=response.queue_time_s,
        first_token_time_s=response.first_token_time_s,
    )


def piece_from_proto(piece: mii_pb2.Piece) -> Response:
    return Response(
        generated_text=piece.generated_text,
        prompt_length=piece.prompt_length,
        generated_length=piece.generated_length,
        finish_reason=piece.finish_reason or None,
        token_ids=list(piece.token_ids),
        queue_time_s=piece.queue_time_s if piece.HasField("queue_time_s") else None,
        first_token_time_s=(
            piece.first_token_time_s if piece.HasField("first_token_time_s") else None
        ),
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


# A prompt on the wire: text (the engine tokenizes it, special tokens added) or
# token ids (the engine takes them as they are: chat prompts).
Prompt = str | list[int]


def prompts_from_proto(request: mii_pb2.GenerateRequest) -> list[Prompt]:
    """The request's prompts: its texts, or its token-id prompts. A request that
    sets both is InvalidRequestError naming ``prompts``."""
    if not request.prompt_ids:
        return list(request.prompts)
    if request.prompts:
        raise InvalidRequestError(
            "a request carries text prompts or token-id prompts (prompt_ids), not both",
            field="prompts",
        )
    return [list(p.ids) for p in request.prompt_ids]


def stream_prompt(request: mii_pb2.GenerateRequest) -> Prompt:
    """The one prompt of a GenerateStream request; InvalidRequestError naming
    ``prompts`` unless it has exactly one."""
    prompts = prompts_from_proto(request)
    if len(prompts) != 1:
        raise InvalidRequestError("GenerateStream takes exactly one prompt", field="prompts")
    return prompts[0]


def _check_token_ids(prompts: list[list[int]]) -> None:
    if not prompts:
        raise InvalidRequestError("at least one prompt is needed", field="prompts")
    if len(prompts) > MAX_PROMPTS:
        raise InvalidRequestError(
            f"at most {MAX_PROMPTS} prompts per request (got {len(prompts)})", field="prompts"
        )
    for ids in prompts:
        if not isinstance(ids, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in ids
        ):
            raise InvalidRequestError("a token-id prompt is a list of integers", field="prompt")
        if any(not -(2**63) <= t < 2**63 for t in ids):
            raise InvalidRequestError("token ids must fit in 64 bits", field="prompt")


def _check_stop(params: dict[str, Any]) -> None:
    stop = params.get("stop")
    for text in [stop] if isinstance(stop, str) else stop or ():
        _check_unicode(text, "stop", "a stop string")


def generate_request(prompts: list[str], params: dict[str, Any]) -> mii_pb2.GenerateRequest:
    """The request message for text ``prompts`` with (validated) options. Prompts
    that are not a non-empty list of strings, and a prompt or stop string that is
    not valid Unicode (a lone surrogate), are refused naming the field, rather than
    failing in the protobuf encoder."""
    for prompt in prompt_list(prompts):
        _check_unicode(prompt, "prompt", "the prompt")
    _check_stop(params)
    return mii_pb2.GenerateRequest(prompts=prompts, options=options_to_proto(params))


def token_ids_request(prompts: list[list[int]], params: dict[str, Any]) -> mii_pb2.GenerateRequest:
    """The request message for token-id ``prompts`` (sent in ``prompt_ids``, taken by
    the engine as they are) with (validated) options."""
    _check_token_ids(prompts)
    _check_stop(params)
    prompt_ids = [mii_pb2.TokenIds(ids=ids) for ids in prompts]
    return mii_pb2.GenerateRequest(prompt_ids=prompt_ids, options=options_to_proto(params))


def request_for(prompts: list[Prompt], params: dict[str, Any]) -> mii_pb2.GenerateRequest:
    """``token_ids_request`` when the first prompt is token ids, else ``generate_request``
    (one request holds one kind)."""
    if isinstance(prompts, list) and prompts and isinstance(prompts[0], list):
        return token_ids_request(prompts, params)
    return generate_request(prompts, params)
