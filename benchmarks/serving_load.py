"""The serving benchmark's workload, load generators and metrics (see serving.py).

Workload: requests with a prompt of an exact token count and a generation
length, both ~N(mean, 0.3 x mean), clipped so that prompt + generation fits the
model's ``max_length``. Neither the gRPC ``GenerateRequest`` nor the OpenAI
``/v1/completions`` route takes token ids today (both take text only), so a
prompt is built as token ids (random "words" of the tokenizer's vocabulary, no
special tokens), decoded to text and re-encoded with the server's tokenizer
call (special tokens included, as the server counts ``prompt_length``), then
trimmed or extended until the count is exact. The count the server reports
is recorded too, and any request whose count differs is reported.

Load: Poisson arrivals at a given rate, one streaming request per arrival,
over gRPC (``client.astream``: one piece per token, each with its ids) or over
HTTP (``/v1/completions`` with ``stream: true`` through ``httpx.AsyncClient``,
as load tools do: one SSE chunk per piece of text, ``usage`` in a last chunk).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

PREFILL_TOKENS_PER_S = 512  # FastGen: the first token within prompt_tokens / 512 s
MIN_DECODE_TOKENS_PER_S = 4  # FastGen: generation keeps at least 4 tokens/s
FIX_UP_ROUNDS = 20


@dataclass(frozen=True)
class Request:
    prompt: str
    prompt_tokens: int  # the tokenizer's count for this text, special tokens included
    max_new_tokens: int


@dataclass
class Timing:
    """What one request saw: when it was sent, when each piece carrying tokens came,
    the server's token counts, and when it ended (or why it failed)."""

    sent: float = 0.0
    stamps: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    generated: int = 0
    done: float = 0.0
    error: str | None = None


Send = Callable[[Request, Timing], Awaitable[None]]


# ----- the workload -----------------------------------------------------------------


def normal_lengths(rng: random.Random, mean: float, n: int, low: int = 1) -> list[int]:
    """``n`` lengths ~N(mean, 0.3 x mean), at least ``low``."""
    return [max(low, round(rng.gauss(mean, 0.3 * mean))) for _ in range(n)]


def clipped_lengths(
    rng: random.Random, prompt_mean: float, gen_mean: float, n: int, max_length: int, low: int
) -> list[tuple[int, int]]:
    """(prompt tokens, generation tokens) pairs with prompt + generation <= ``max_length``
    and prompts of at least ``low`` tokens: the generation is clipped first (to leave
    room for a minimal prompt), then the prompt to the room the generation leaves."""
    prompts = normal_lengths(rng, prompt_mean, n, low)
    gens = normal_lengths(rng, gen_mean, n)
    pairs = []
    for prompt, gen in zip(prompts, gens):
        gen = min(gen, max_length - low)
        pairs.append((min(prompt, max_length - gen), gen))
    return pairs


def mixed_lengths(
    rng: random.Random,
    short_share: float,
    short_mean: float,
    long_pairs: list[tuple[int, int]],
    max_length: int,
    low: int,
) -> tuple[list[tuple[int, int]], list[bool]]:
    """``long_pairs`` with about ``short_share`` of them given a prompt ~N(short_mean,
    0.3 x mean) instead (chat turns among long documents), generations kept; and
    which ones were (the classes overlap in length: a long draw can be short)."""
    shorts = clipped_lengths(rng, short_mean, 1, len(long_pairs), max_length, low)
    chosen = [rng.random() < short_share for _ in long_pairs]
    pairs = [
        (min(short[0], max_length - gen), gen) if pick else (prompt, gen)
        for (prompt, gen), short, pick in zip(long_pairs, shorts, chosen)
    ]
    return pairs, chosen


def by_prompt_class(
    requests: list[Request], timings: list[Timing], short: list[bool]
) -> dict[str, tuple[list[Request], list[Timing]]]:
    """The requests (and their timings) drawn as short prompts ("short") and the
    others ("long")."""
    classes: dict[str, tuple[list[Request], list[Timing]]] = {"short": ([], []), "long": ([], [])}
    for request, timing, is_short in zip(requests, timings, short):
        kind = classes["short" if is_short else "long"]
        kind[0].append(request)
        kind[1].append(timing)
    return classes


def word_ids(tokenizer) -> list[int]:
    """Ids of whole-word tokens (a word-start marker then ASCII letters): texts made
    of them re-encode to the same ids. Falls back to every non-special token that
    decodes to printable ASCII when the vocabulary has few such words."""
    special = set(tokenizer.all_special_ids)
    ids = [i for i in range(len(tokenizer)) if i not in special]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    words = [
        i
        for i, tok in zip(ids, tokens)
        if tok[:1] in ("Ġ", "▁") and tok[1:].isascii() and tok[1:].isalpha()
    ]
    if len(words) >= 32:
        return words
    return [i for i in ids if (text := tokenizer.decode([i])).isascii() and text.isprintable()]


class PromptMaker:
    """Texts of an exact token count under ``tokenizer`` (special tokens included)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.words = word_ids(tokenizer)
        self.overhead = len(tokenizer("").input_ids)  # e.g. BOS

    @property
    def min_tokens(self) -> int:
        return self.overhead + 1

    def count(self, text: str) -> int:
        return len(self.tokenizer(text).input_ids)

    def make(self, rng: random.Random, tokens: int) -> tuple[str, int]:
        """A text of ``tokens`` tokens and its count (exact, unless the tokenizer would
        not settle within FIX_UP_ROUNDS: then the closest count found last)."""
        ids = [rng.choice(self.words) for _ in range(max(1, tokens - self.overhead))]
        for _ in range(FIX_UP_ROUNDS):
            text = self.tokenizer.decode(ids, clean_up_tokenization_spaces=False)
            count = self.count(text)
            if count == tokens:
                break
            ids = self.tokenizer(text, add_special_tokens=False).input_ids  # canonical ids
            if count > tokens:
                ids = ids[: max(1, len(ids) - (count - tokens))]
            else:
                ids += [rng.choice(self.words) for _ in range(tokens - count)]
        return text, count


def request_set(maker: PromptMaker, lengths: list[tuple[int, int]], seed: int) -> list[Request]:
    """One request per (prompt, generation) length pair; ``seed`` draws the prompts' words."""
    rng = random.Random(seed)
    requests = []
    for prompt_len, gen in lengths:
        text, count = maker.make(rng, prompt_len)
        requests.append(Request(text, count, gen))
    return requests


def poisson_arrivals(rng: random.Random, rate: float, n: int) -> list[float]:
    """Send times (s from the start) of ``n`` arrivals of a Poisson process."""
    return list(itertools.accumulate(rng.expovariate(rate) for _ in range(n)))


# ----- load generators --------------------------------------------------------------


def grpc_sender(client) -> Send:
    """Streams one request over gRPC; every piece carries its new token ids."""

    async def send(request: Request, timing: Timing) -> None:
        stream = client.astream(
            request.prompt, max_new_tokens=request.max_new_tokens, ignore_eos=True, do_sample=False
        )
        async for piece in stream:
            if piece.token_ids:
                timing.stamps.append(time.perf_counter())
            timing.prompt_tokens = piece.prompt_length
            timing.generated = piece.generated_length

    return send


class HttpSender:
    """Streams one request through ``/v1/completions`` (SSE) with a shared
    ``httpx.AsyncClient``. A chunk is timed when it carries text; the token
    counts come from the ``usage`` chunk that ``stream_options.include_usage`` adds."""

    def __init__(self, base_url: str, model: str) -> None:
        import httpx

        self.model = model
        # No connection cap: a pool limit would queue requests in the client, not the server.
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        self.client = httpx.AsyncClient(base_url=base_url, timeout=None, limits=limits)

    def body(self, request: Request) -> dict[str, Any]:
        return {
            "model": self.model,
            "prompt": request.prompt,
            "max_tokens": request.max_new_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }

    async def __call__(self, request: Request, timing: Timing) -> None:
        async with self.client.stream("POST", "/v1/completions", json=self.body(request)) as reply:
            if reply.status_code != 200:
                timing.error = f"HTTP {reply.status_code}: {(await reply.aread())[:200]!r}"
                return
            async for line in reply.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                self.read_chunk(json.loads(line[len("data: ") :]), timing)

    @staticmethod
    def read_chunk(chunk: dict[str, Any], timing: Timing) -> None:
        if "error" in chunk:
            timing.error = str(chunk["error"].get("message", chunk["error"]))
        if any(choice.get("text") for choice in chunk.get("choices", [])):
            timing.stamps.append(time.perf_counter())
        if chunk.get("usage"):
            timing.prompt_tokens = chunk["usage"]["prompt_tokens"]
            timing.generated = chunk["usage"]["completion_tokens"]

    async def aclose(self) -> None:
        await self.client.aclose()


async def timed(send: Send, request: Request) -> Timing:
    """Run one request; a failure is recorded, not raised."""
    timing = Timing(sent=time.perf_counter())
    try:
        await send(request, timing)
    except Exception as err:  # a failed request counts as not served
        timing.error = f"{type(err).__name__}: {err}"
    timing.done = time.perf_counter()
    return timing


async def run_arrivals(
    send: Send, requests: list[Request], arrivals: list[float]
) -> tuple[float, list[Timing]]:
    """Send each request at its arrival time; the start time and every timing."""
    start = time.perf_counter()

    async def at(request: Request, offset: float) -> Timing:
        await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
        return await timed(send, request)

    timings = await asyncio.gather(*(at(r, a) for r, a in zip(requests, arrivals)))
    return start, list(timings)


# ----- metrics ----------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (0 for no values)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def served(t: Timing) -> bool:
    """The request ended without error and streamed at least one token."""
    return t.error is None and bool(t.stamps)


def ttft(t: Timing) -> float:
    return t.stamps[0] - t.sent


def tpot(t: Timing) -> float:
    """Mean time per output token after the first (0 for one token)."""
    return (t.stamps[-1] - t.stamps[0]) / (t.generated - 1) if t.generated > 1 else 0.0


def is_effective(t: Timing) -> bool:
    """FastGen: the first token within prompt_tokens / 512 s, then >= 4 tokens/s."""
    return (
        ttft(t) <= t.prompt_tokens / PREFILL_TOKENS_PER_S and tpot(t) <= 1 / MIN_DECODE_TOKENS_PER_S
    )


def p50_p99(values: list[float], scale: float = 1e3, digits: int = 1) -> dict[str, float]:
    return {
        "p50": round(percentile(values, 0.5) * scale, digits),
        "p99": round(percentile(values, 0.99) * scale, digits),
    }


def summarize(
    rate: float, requests: list[Request], start: float, timings: list[Timing]
) -> dict[str, Any]:
    """One rate's row: served and effective requests/s over the wall time (the
    first arrival's schedule start to the last request's end), TTFT/TPOT/ITL in ms.
    ITL is the gap between consecutive timed pieces (gRPC: tokens; HTTP: chunks)."""
    ok = [t for t in timings if served(t)]
    wall = max(t.done for t in timings) - start
    itl = [b - a for t in ok for a, b in itertools.pairwise(t.stamps)]
    errors = sorted({t.error for t in timings if t.error})
    off = sum(served(t) and t.prompt_tokens != r.prompt_tokens for r, t in zip(requests, timings))
    return {
        "offered_rps": rate,
        "requests": len(requests),
        "completed": len(ok),
        "failed": len(timings) - len(ok),
        "wall_s": round(wall, 2),
        "served_rps": round(len(ok) / wall, 2),
        "effective_rps": round(sum(map(is_effective, ok)) / wall, 2),
        "output_tok_s": round(sum(t.generated for t in ok) / wall, 1),
        "ttft_ms": p50_p99([ttft(t) for t in ok]),
        "tpot_ms": p50_p99([tpot(t) for t in ok], digits=2),
        "itl_ms": p50_p99(itl, digits=2),
        "mean_prompt_tokens": round(sum(t.prompt_tokens for t in ok) / max(1, len(ok)), 1),
        # timed pieces per generated token: 1 over gRPC; over HTTP less when text is held back
        "pieces_per_token": round(
            sum(len(t.stamps) for t in ok) / max(1, sum(t.generated for t in ok)), 3
        ),
        "prompt_tokens_off": off,  # served prompts whose server count differs from the target
        "errors": errors[:3],
    }
