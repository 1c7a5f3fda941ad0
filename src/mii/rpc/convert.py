"""Conversions between mii's Python objects and the protobuf messages."""

from __future__ import annotations

from typing import Any

from mii.config import OPTION_ALIASES, GenerateParams
from mii.errors import InvalidRequestError
from mii.prompts import Prompt, prompt_batch
from mii.response import Response, TokenLogprob
from mii.rpc import mii_pb2

# Channel options for messages of any size (grpc's default caps what a channel
# receives at 4 MiB): replies can be larger than that (return_full_text).
UNLIMITED_MESSAGES = (
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_send_message_length", -1),
)

# Channel options of long-lived channels (a client's, the balancer's to each
# replica): a deployment or replica that comes back is found again within a second.
# (gRPC's default reconnect back-off grows to two minutes: a client whose deployment
# was down for 30 s took 15 s more to reach it once restarted.)
QUICK_RECONNECT = (
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
)
# (Not grpc.min_reconnect_backoff_ms: gRPC reads it as the time one connection
# attempt may take, 20 s by default; 200 ms failed first calls over slow links.)

# What a replica's GenerateStream sends as initial metadata once its engine accepted
# the request, before any token (engine/answer_stream.py says who waits for it).
ACCEPTED_METADATA = (("mii-accepted", "1"),)

# Prompts per request: each is tokenized and queued on the replica's event loop,
# so a request of a million one-word prompts would stall every other request.
MAX_PROMPTS = 1024

# Options that are not one scalar field of GenerationOptions each.
_LIST_OPTIONS = ("stop", "stop_token_ids", "allowed_token_ids", "logit_bias", "choice")
_SCALAR_OPTIONS = [name for name in GenerateParams.model_fields if name not in _LIST_OPTIONS]


def options_to_proto(params: dict[str, Any]) -> mii_pb2.GenerationOptions:
    """Generation options (already validated) as a typed message."""
    options = mii_pb2.GenerationOptions()
    for name, value in params.items():
        if value is None:
            continue
        if name == "stop":
            options.stop.extend([value] if isinstance(value, str) else list(value))
        elif name == "stop_token_ids":
            options.stop_token_ids.extend(value)
        elif name == "allowed_token_ids":
            options.allowed_token_ids.extend(value)
        elif name == "logit_bias":
            options.logit_bias.update(value)
        elif name == "choice":
            options.choice.extend(value)
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
    if options.stop_token_ids:
        params["stop_token_ids"] = list(options.stop_token_ids)
    if options.allowed_token_ids:
        params["allowed_token_ids"] = list(options.allowed_token_ids)
    if options.logit_bias:
        params["logit_bias"] = dict(options.logit_bias)
    if options.choice:
        params["choice"] = list(options.choice)
    if options.HasField("min_tokens"):  # other clients' name of min_new_tokens
        params["min_tokens"] = options.min_tokens
    return params


def _logprob_to_proto(entry: TokenLogprob | None) -> mii_pb2.TokenLogprob:
    if entry is None:  # the first prompt token: nothing to score it by
        return mii_pb2.TokenLogprob()
    return mii_pb2.TokenLogprob(
        token_id=entry.token_id,
        logprob=entry.logprob,
        top_ids=[t for t, _ in entry.top],
        top_logprobs=[lp for _, lp in entry.top],
        rank=entry.rank,
    )


def _logprob_from_proto(entry: mii_pb2.TokenLogprob) -> TokenLogprob | None:
    if not entry.HasField("logprob"):
        return None
    top = list(zip(entry.top_ids, entry.top_logprobs))
    rank = entry.rank if entry.HasField("rank") else None
    return TokenLogprob(entry.token_id, entry.logprob, top, rank)


def piece_to_proto(response: Response) -> mii_pb2.Piece:
    return mii_pb2.Piece(
        generated_text=response.generated_text,
        prompt_length=response.prompt_length,
        generated_length=response.generated_length,
        finish_reason=response.finish_reason or "",
        token_ids=response.token_ids,
        logprobs=[_logprob_to_proto(e) for e in response.logprobs or ()],
        prompt_logprobs=[_logprob_to_proto(e) for e in response.prompt_logprobs or ()],
        prompt_token_ids=response.prompt_token_ids or (),
        cached_tokens=response.cached_tokens,
        stop_string=response.stop_reason if isinstance(response.stop_reason, str) else None,
        stop_token_id=response.stop_reason if isinstance(response.stop_reason, int) else None,
        queue_time_s=response.queue_time_s,
        first_token_time_s=response.first_token_time_s,
    )


def _stop_reason(piece: mii_pb2.Piece) -> str | int | None:
    if piece.HasField("stop_string"):
        return piece.stop_string
    return piece.stop_token_id if piece.HasField("stop_token_id") else None


def piece_from_proto(piece: mii_pb2.Piece) -> Response:
    return Response(
        generated_text=piece.generated_text,
        prompt_length=piece.prompt_length,
        generated_length=piece.generated_length,
        finish_reason=piece.finish_reason or None,
        token_ids=list(piece.token_ids),
        # empty: the request asked for none (a piece that asked has one per token)
        logprobs=[_logprob_from_proto(e) for e in piece.logprobs] or None,
        prompt_logprobs=[_logprob_from_proto(e) for e in piece.prompt_logprobs] or None,
        prompt_token_ids=list(piece.prompt_token_ids) or None,
        cached_tokens=piece.cached_tokens,
        stop_reason=_stop_reason(piece),
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
    names = dict.fromkeys(OPTION_ALIASES.get(name, name) for name in params)  # min_tokens
    return {name: getattr(parsed, name) for name in names}


def prompt_list(prompts: Any, field: str = "prompts") -> list[Prompt]:
    """``prompts`` as one request's list of prompts (see :func:`mii.prompts.prompt_batch`:
    a string or a flat list of token ids is one prompt), at most MAX_PROMPTS of them,
    all texts or all token ids (a request carries one kind). Anything else (None,
    bytes, numbers, an empty or too long list, a mix) is InvalidRequestError naming
    ``field``."""
    return request_batch(prompt_batch(prompts, field), field)


def request_batch(batch: list[Prompt], field: str = "prompts") -> list[Prompt]:
    """``batch`` (from :func:`mii.prompts.prompt_batch`) when one request may carry it:
    at most MAX_PROMPTS prompts, all of one kind; else InvalidRequestError naming
    ``field``."""
    if len(batch) > MAX_PROMPTS:
        raise InvalidRequestError(
            f"at most {MAX_PROMPTS} prompts per request (got {len(batch)}); "
            "send them in several requests",
            field=field,
        )
    if len({isinstance(p, str) for p in batch}) > 1:
        raise InvalidRequestError(
            "the prompts of one request are all texts or all token-id lists; "
            "send the others in another request",
            field=field,
        )
    return batch


def _check_unicode(text: str, field: str, what: str) -> None:
    # protobuf strings are UTF-8: a lone surrogate would fail in the encoder.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise InvalidRequestError(
            f"{what} is not valid Unicode ({err.reason} at position {err.start})", field=field
        ) from None


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


def _check_option_texts(params: dict[str, Any]) -> None:
    """Every text an option carries (stop strings, a choice's options, a regex, a
    grammar, a schema's JSON text) valid Unicode, else InvalidRequestError naming
    the option: the protobuf encoder would fail on a lone surrogate."""
    for name, value in params.items():
        texts = (
            [value] if isinstance(value, str) else value if isinstance(value, (list, tuple)) else ()
        )
        what = "a stop string" if name == "stop" else f"the {name} option"
        for text in texts:
            if isinstance(text, str):
                _check_unicode(text, name, what)


def generate_request(prompts: list[str], params: dict[str, Any]) -> mii_pb2.GenerateRequest:
    """The request message for text ``prompts`` with (validated) options. Prompts
    that are not a non-empty list of strings, and a prompt or stop string that is
    not valid Unicode (a lone surrogate; also any option's text), are refused naming
    the field, rather than failing in the protobuf encoder."""
    texts = prompt_list(prompts)
    if not isinstance(texts[0], str):
        raise InvalidRequestError("these prompts are token ids, not texts", field="prompts")
    for prompt in texts:
        _check_unicode(prompt, "prompt", "the prompt")
    _check_option_texts(params)
    return mii_pb2.GenerateRequest(prompts=texts, options=options_to_proto(params))


def token_ids_request(prompts: list[list[int]], params: dict[str, Any]) -> mii_pb2.GenerateRequest:
    """The request message for token-id ``prompts`` (sent in ``prompt_ids``, taken by
    the engine as they are) with (validated) options."""
    _check_token_ids(prompts)
    _check_option_texts(params)
    prompt_ids = [mii_pb2.TokenIds(ids=ids) for ids in prompts]
    return mii_pb2.GenerateRequest(prompt_ids=prompt_ids, options=options_to_proto(params))


def request_for(prompts: Any, params: dict[str, Any]) -> mii_pb2.GenerateRequest:
    """The request message for ``prompts`` (as :func:`prompt_list` reads them: one
    text, one list of token ids, or a list of either kind) with (validated) options:
    texts in ``prompts``, token ids in ``prompt_ids`` (one request holds one kind)."""
    batch = prompt_list(prompts)
    if isinstance(batch[0], list):
        return token_ids_request(batch, params)
    return generate_request(batch, params)
