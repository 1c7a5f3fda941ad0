"""Every choice of an OpenAI request, run through the pool.

A request has one or more prompts and ``n`` choices of each; choice ``index`` is
``prompt * n + i``. With a ``seed``, choice 0 uses the seed itself and choice i
a seed derived from (seed, i), so that choices differ and the whole answer is
reproducible.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
from collections.abc import AsyncIterator
from typing import Any

from mii.response import Response
from mii.rpc.convert import Prompt
from mii.rpc.http.errors import ApiError
from mii.rpc.http.protocol import MAX_CHOICES
from mii.rpc.http.state import GatewayState
from mii.rpc.outcomes import count_ending, withdraw

_SEED_SPACE = 2**63


def choice_seed(seed: int | None, choice: int) -> int | None:
    """Choice 0 uses ``seed`` itself; choice i a seed derived from (seed, i)."""
    if seed is None:
        return None
    base = seed % _SEED_SPACE  # OpenAI allows any 64-bit seed; mii wants [0, 2**63)
    if choice == 0:
        return base
    digest = hashlib.blake2b(f"{base}/{choice}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % _SEED_SPACE


class Choices:
    """Every (prompt, choice) of a request. Choice ``index`` = prompt * n + i. A prompt
    is a text or token ids (a chat prompt, or a token-id prompt of /v1/completions)."""

    def __init__(self, prompts: list[Prompt], params: dict[str, Any], n: int, seed: int | None):
        if len(prompts) * n > MAX_CHOICES:
            raise ApiError(
                400,
                f"at most {MAX_CHOICES} choices (prompts times n) per request: "
                f"{len(prompts)} prompts x n={n}; send fewer in each request",
                "n" if n > 1 else "prompt",  # the one to change
            )
        self.prompts = prompts
        self.params = params
        self.n = n
        self.seed = seed

    @property
    def total(self) -> int:
        return len(self.prompts) * self.n

    def params_for(self, choice: int) -> dict[str, Any]:
        seed = choice_seed(self.seed, choice)
        return self.params if seed is None else {**self.params, "seed": seed}

    async def generate(self, state: GatewayState) -> list[Response]:
        """Whole answers, by choice index (one pool call per choice number)."""
        # A prompt's logprobs are of the model's raw distribution, the same for every
        # choice: choice 0 scores the prompt and the others copy its scores (each
        # choice scored it again, without the prefix cache: n=8 took 9.0 s, not 1.4 s).
        shared = self.n > 1 and self.params.get("prompt_logprobs") is not None
        params = [self.params_for(i) for i in range(self.n)]
        if shared:
            params[1:] = [_without_prompt_logprobs(p) for p in params[1:]]
        tasks = [asyncio.ensure_future(state.pool.generate(self.prompts, p)) for p in params]
        try:
            by_choice = await asyncio.gather(*tasks)  # [i][prompt]
        except asyncio.CancelledError:  # the client left: each choice is cancelled
            for task in tasks:
                task.cancel()
            raise
        except BaseException as err:  # a choice failed or was refused: the others go with it
            # ...and end as it did, in the metrics (each choice is a sequence there): the
            # ones still running count here, not as withdrawn (their ending is not theirs).
            unfinished = sum(not task.done() for task in tasks)
            for task in tasks:
                withdraw(task)
            count_ending(state.pool.metrics, err, unfinished * len(self.prompts))
            raise
        if shared:
            scored = by_choice[0]
            for answers in by_choice[1:]:
                answers[:] = [_scored_as(a, s) for a, s in zip(answers, scored, strict=True)]
        return [by_choice[i][p] for p in range(len(self.prompts)) for i in range(self.n)]

    def streams(self, state: GatewayState) -> list[tuple[int, AsyncIterator[Response | None]]]:
        """One stream per choice, with its index. With several choices each first
        gives a ``None`` when the engine accepted it (``pool.stream``'s ``announce``):
        the answer starts once all are. One choice's answer starts at its first
        piece, as before, so a failure until then is still a status (a 503 that
        clients retry), not an error event."""
        announce = self.total > 1
        return [
            (p * self.n + i, state.pool.stream(prompt, self.params_for(i), announce=announce))
            for p, prompt in enumerate(self.prompts)
            for i in range(self.n)
        ]


def _without_prompt_logprobs(params: dict[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in params.items() if name != "prompt_logprobs"}


def _scored_as(answer: Response, scored: Response) -> Response:
    """``answer`` with the prompt scores of ``scored`` (the same prompt's choice 0)."""
    return dataclasses.replace(
        answer, prompt_logprobs=scored.prompt_logprobs, prompt_token_ids=scored.prompt_token_ids
    )


_END = object()


async def merge_streams(
    streams: list[tuple[int, AsyncIterator[Response | None]]], metrics: Any
) -> AsyncIterator[tuple[int, Response | None]]:
    """Pieces of several streams as (index, piece), in arrival order. Closing this
    iterator closes every stream (which aborts their requests). When one fails,
    the others still running are withdrawn and counted in ``metrics`` as ending as
    it did (each choice is a sequence there)."""
    queue: asyncio.Queue = asyncio.Queue()
    ended: set[int] = set()  # streams that ended on their own: answered, or failed

    async def pump(index: int, stream: AsyncIterator[Response]) -> None:
        try:
            async for piece in stream:
                if piece is not None and piece.finish_reason is not None:
                    ended.add(index)  # answered (and counted), before its stream's end
                queue.put_nowait((index, piece))
            ended.add(index)
        except Exception as err:
            ended.add(index)
            queue.put_nowait((index, err))
        finally:
            await stream.aclose()
            queue.put_nowait((index, _END))

    tasks = [asyncio.create_task(pump(index, stream)) for index, stream in streams]
    failed = False
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is _END:
                remaining -= 1
            elif isinstance(item, BaseException):
                failed = True
                count_ending(metrics, item, len(tasks) - len(ended))
                raise item
            else:
                yield index, item
    finally:  # a choice failed (the others go with the request), or the client left
        for task in tasks:
            if failed:
                withdraw(task)
            else:
                task.cancel()


class Usage:
    """Token counts of a request's choices: each prompt counted once, every choice's answer."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.prompt: dict[int, int] = {}  # prompt number -> prompt tokens
        self.completion: dict[int, int] = {}  # choice index -> generated tokens
        # prompt number -> its tokens found in the prefix cache (the fewest of any of
        # its choices: what the prompt itself cost is counted once)
        self.cached: dict[int, int] = {}

    def add_prompt(self, index: int, tokens: int) -> None:
        """Count the ``tokens`` of choice ``index``'s prompt (not yet its answer)."""
        self.prompt[index // self.n] = tokens

    def add(self, index: int, response: Response) -> None:
        prompt = index // self.n
        self.add_prompt(index, response.prompt_length)
        self.completion[index] = response.generated_length
        self.cached[prompt] = min(
            self.cached.get(prompt, response.cached_tokens), response.cached_tokens
        )

    def choice_dict(self, index: int) -> dict[str, Any]:
        """Choice ``index``'s usage so far: its prompt and its own tokens (vLLM's
        per-chunk usage)."""
        prompt, completion = self.prompt.get(index // self.n, 0), self.completion.get(index, 0)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    def as_dict(self) -> dict[str, Any]:
        prompt, completion = sum(self.prompt.values()), sum(self.completion.values())
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(self.cached.values())},
        }
