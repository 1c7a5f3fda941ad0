"""Prompts as every surface takes them: a text, a list of token ids, or a list of either.

The same call shapes hold for the pipeline, ``AsyncEngine.generate``, the Python
client of a deployment and the REST route ``/mii/{deployment}``:

- ``"text"``: one text prompt (the engine tokenizes it, special tokens added);
- ``[1, 2, 3]``: one prompt given as token ids (taken as they are, nothing added);
- ``["a", "b"]``, ``[[1, 2], [3]]``: several prompts.

Token ids may also come as a tensor or array (1-D: one prompt, 2-D: one per row)
or as a tokenizer's ``BatchEncoding`` (its ``input_ids``: what transformers'
``apply_chat_template`` returns by default).

A flat list of integers is therefore one prompt, never several one-token prompts,
as OpenAI's and vLLM's ``prompt`` reads it. Whether every id is inside the model's
vocabulary is checked by the engine, which knows its size.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from mii.errors import InvalidRequestError

# A prompt as the engine takes it: text, or token ids.
Prompt = str | list[int]

MAX_TOKEN_ID = 2**63  # ids travel as protobuf int64


def _is_id(value: Any) -> bool:
    # bool is an int to Python, but true is no token id; numpy integers are fine.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _as_ids(value: Any) -> list[int] | None:
    """``value`` as a new list of ints when it is a non-empty list or tuple of
    integers, else None. One pass at C speed for plain ints (what JSON and protobuf
    give: a long prompt is read on an event loop); numpy integers the slow way."""
    if not isinstance(value, (list, tuple)) or not value:
        return None
    if set(map(type, value)) == {int}:
        return list(value)
    if all(_is_id(t) for t in value):
        return [int(t) for t in value]
    return None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _in_range(ids: list[int], field: str) -> list[int]:
    if min(ids) < 0 or max(ids) >= MAX_TOKEN_ID:
        bad = next(t for t in ids if not 0 <= t < MAX_TOKEN_ID)
        raise InvalidRequestError(
            f"token ids are integers from 0 up to the vocabulary size (got {bad})", field=field
        )
    return ids


def token_ids(value: Sequence[Any], field: str = "prompt") -> list[int]:
    """``value`` (a non-empty sequence of integers) as a list of ids in [0, 2**63);
    InvalidRequestError naming ``field`` otherwise."""
    ids = _as_ids(value)
    if ids is None:
        raise InvalidRequestError(
            f"a token-id prompt is a non-empty list of integers (got {_short(value)})",
            field=field,
        )
    return _in_range(ids, field)


def _lists(value: Any) -> Any:
    """A torch tensor, numpy array or range as (nested) lists; anything else unchanged."""
    if isinstance(value, range):  # (generate took one; stream refused it)
        return list(value)
    tolist = getattr(value, "tolist", None)
    if callable(tolist) and hasattr(value, "shape") and not isinstance(value, (list, tuple)):
        return tolist()
    return value


def _plain(value: Any) -> Any:
    """Token ids held by a tokenizer's ``BatchEncoding`` (its ``input_ids``, without
    the positions its ``attention_mask`` marks as padding), a torch tensor or a
    numpy array, as (nested) lists; anything else unchanged."""
    if not (isinstance(value, Mapping) and "input_ids" in value):
        return _lists(value)
    ids, mask = _lists(value["input_ids"]), _lists(value.get("attention_mask"))
    if isinstance(ids, list) and isinstance(mask, list) and len(mask) == len(ids):
        if ids and isinstance(ids[0], list):  # a padded batch
            return [[t for t, m in zip(row, keep) if m] for row, keep in zip(ids, mask)]
        return [t for t, m in zip(ids, mask) if m]
    return ids


def one_prompt(prompt: Any, field: str = "prompt") -> Prompt:
    """One prompt: a string, or a non-empty list of token ids (a one-row batch of
    ids too, as ``return_tensors="pt"`` gives)."""
    prompt = _plain(prompt)
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, (list, tuple)):
        return token_ids(prompt, field)
    raise InvalidRequestError(
        f"a prompt is a string or a non-empty list of token ids (got {_short(prompt)})",
        field=field,
    )


def one_streamed_prompt(prompt: Any, field: str = "prompt") -> Prompt:
    """``one_prompt`` for a stream: a list of texts (or of several token-id lists) is
    refused as several prompts, which a stream cannot take (it read "a token-id prompt
    is a non-empty list of integers")."""
    prompt = _plain(prompt)  # (a tensor's or BatchEncoding's rows)
    if isinstance(prompt, (list, tuple)) and (
        any(isinstance(p, str) for p in prompt)
        or (len(prompt) > 1 and all(isinstance(p, (list, tuple)) for p in prompt))
    ):
        raise InvalidRequestError(
            "stream takes one prompt; use generate for several, or stream each", field=field
        )
    return one_prompt(prompt, field)


def prompt_batch(prompts: Any, field: str = "prompts") -> list[Prompt]:
    """``prompts`` as a list of prompts: a string or a flat list of token ids is one
    prompt; a non-empty list (tuple, iterable) of strings and token-id lists is several.
    Anything else is InvalidRequestError naming ``field``."""
    prompts = _plain(prompts)
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, Iterable) and not isinstance(prompts, (bytes, bytearray, Mapping)):
        prompts = list(prompts)  # a generator, a dataset column, ...
    if not isinstance(prompts, list) or not prompts:
        raise InvalidRequestError(
            "prompts must be a string, a list of token ids, or a non-empty list of those "
            f"(got {_short(prompts)})",
            field=field,
        )
    ids = _as_ids(prompts)
    if ids is not None:  # one prompt of token ids
        return [_in_range(ids, field)]
    batch: list[Prompt] = []
    for prompt in map(_plain, prompts):
        if not isinstance(prompt, (str, list, tuple)):
            # ([True, False] is no token-id prompt: it reached here as two prompts)
            kind = " (booleans are not token ids)" if isinstance(prompt, bool) else ""
            raise InvalidRequestError(
                "every prompt must be a string or a non-empty list of token ids "
                f"(got {_short(prompt)}){kind}",
                field=field,
            )
        batch.append(one_prompt(prompt, field))
    return batch


def max_prompt_chars(tokenizer, max_length: int) -> int | None:
    """The prompt-size limit in characters: ``max_length`` tokens of the tokenizer's
    longest token, twice over (normalizers can merge characters). A longer text
    cannot fit under ``max_length`` tokens. None when the vocabulary is unknown."""
    try:
        longest = max(map(len, tokenizer.get_vocab()), default=0)
    except Exception:  # a tokenizer without get_vocab: no early limit
        return None
    return 2 * max_length * max(longest, 1) if longest else None
