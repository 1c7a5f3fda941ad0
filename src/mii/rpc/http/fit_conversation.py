"""``truncation: "auto"`` of the Responses API: a conversation longer than the
context window loses its oldest turns, never its instructions.

OpenAI fits such a conversation by dropping input items; the instructions (the
system and developer messages it starts with) and the last item stay. Items go
whole and in order: first the oldest turns (a user message with the answers and
tool results after it), then, within the last turn (an agent's long tool loop),
its oldest answers with their tool results, so that what is left starts as a
conversation does (instructions, then the turn's opening message and the tool
results that answer it) and no tool result loses its call. What still does not
fit (one huge message) is cut to its last tokens by the engine
(``truncate_prompt_tokens``).

The shorter conversations are ``Candidates``, built one at a time (a request of
many items would need memory quadratic in their number to build them all).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import accumulate

from mii.rpc.http.chat import content_chars
from mii.rpc.http.protocol import ChatMessage

INSTRUCTION_ROLES = ("system", "developer")

Render = Callable[[list[ChatMessage]], list[int]]


def fitted_prompt(
    render: Render,
    render_end: Render,
    messages: list[ChatMessage],
    limit: int,
    max_chars: int | None = None,
) -> list[int]:
    """The prompt ids (``render``) of ``messages`` less the fewest oldest items that
    make it fit ``limit`` tokens; when none does, ``render_end`` (the end of the
    prompt: the engine keeps its last tokens) of the shortest. ``max_chars``: text
    longer than this cannot fit, so such conversations are never rendered."""
    candidates = Candidates(messages)
    first = candidates.first_within(max_chars)
    if first is None:  # even the shortest is too long to render whole
        return render_end(candidates[len(candidates) - 1])
    ids = render(candidates[first])  # (most conversations fit: one render)
    if len(ids) <= limit:
        return ids
    # The prompt shrinks as items go: the first candidate that fits, by bisection.
    low, high, best = first + 1, len(candidates) - 1, None
    while low <= high:
        middle = (low + high) // 2
        ids = render(candidates[middle])
        if len(ids) <= limit:
            best, high = ids, middle - 1
        else:
            low = middle + 1
    return best if best is not None else render_end(candidates[len(candidates) - 1])


class Candidates:
    """``messages``, then each shorter conversation that truncation may leave, in
    order (index 0: all of it): less its oldest turns, then less the last turn's
    oldest answers. Each is built when asked for."""

    def __init__(self, messages: list[ChatMessage]) -> None:
        head = 0
        while head < len(messages) and messages[head].role in INSTRUCTION_ROLES:
            head += 1
        self.instructions, rest = messages[:head], messages[head:]
        self.turns = _starts(rest, lambda m: m.role == "user")  # [start, end) of each turn
        last_start = self.turns[-1][0] if self.turns else len(rest)
        last = rest[last_start:]
        # The last turn's opening: its first message and what answers it before the
        # next answer (a tool result follows its call); then the answers.
        opening = 1
        while opening < len(last) and last[opening].role != "assistant":
            opening += 1
        self.opening = last[:opening]
        answers = last[opening:]
        self.answers = _starts(answers, lambda m: m.role == "assistant")
        self.rest, self.answer_items = rest, answers
        # text lengths of the candidates, from suffix sums (one pass)
        rest_chars = _suffix_chars(rest)
        answer_chars = _suffix_chars(answers)
        base = content_chars(self.instructions)
        self.chars = [base + rest_chars[start] for start, _ in self.turns]
        self.chars += [
            base + content_chars(self.opening) + answer_chars[start]
            for start, _ in self.answers[1:]
        ]

    def __len__(self) -> int:
        return max(1, len(self.turns) + max(0, len(self.answers) - 1))

    def __getitem__(self, index: int) -> list[ChatMessage]:
        if not self.turns:
            return self.instructions + self.rest
        if index < len(self.turns):
            return self.instructions + self.rest[self.turns[index][0] :]
        start = self.answers[index - len(self.turns) + 1][0]
        return self.instructions + self.opening + self.answer_items[start:]

    def first_within(self, max_chars: int | None) -> int | None:
        """The first candidate whose text is at most ``max_chars`` long (None: none is)."""
        if max_chars is None or not self.chars:
            return 0
        return next((i for i, chars in enumerate(self.chars) if chars <= max_chars), None)


def _starts(
    messages: Sequence[ChatMessage], starts: Callable[[ChatMessage], bool]
) -> list[tuple[int, int]]:
    """``[start, end)`` of the groups of ``messages``, each begun by a message that
    ``starts`` one (the first group also by whatever comes before such a message)."""
    bounds = [i for i, m in enumerate(messages) if i == 0 or starts(m)]
    return list(zip(bounds, [*bounds[1:], len(messages)]))


def _suffix_chars(messages: Sequence[ChatMessage]) -> list[int]:
    """Text characters of ``messages[i:]`` for each i (and 0 past the end)."""
    sizes = [content_chars([m]) for m in messages]
    return list(accumulate(reversed(sizes), initial=0))[::-1]
