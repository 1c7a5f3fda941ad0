"""Token ids the gateway checks against the deployment's tokenizer.

A token-id prompt whose ids the tokenizer does not know is refused by the gateway
with a 400 naming the field before any replica is asked (as vLLM checks against
its tokenizer): refused by the engine instead, a streamed request of several
prompts would already have its 200 when one of them fails.
"""

from __future__ import annotations

from mii.rpc.http.errors import ApiError


def vocabulary_size(tokenizer) -> int:
    """How many ids the tokenizer knows (its vocabulary and added tokens)."""
    return len(tokenizer)


def check_known_ids(tokenizer, prompts: list[list[int]], field: str) -> None:
    """400 naming ``field`` unless every id of ``prompts`` is in [0, vocabulary size)."""
    size = vocabulary_size(tokenizer)
    for i, ids in enumerate(prompts):
        # min/max run in C: a body of a million ids is checked in milliseconds.
        if ids and (min(ids) < 0 or max(ids) >= size):
            bad = next(t for t in ids if not 0 <= t < size)
            where = f"{field}[{i}]" if len(prompts) > 1 else field
            raise ApiError(
                400,
                f"{where} has the token id {bad}, which is not in this model's vocabulary "
                f"(ids are in [0, {size}))",
                field,
            )
