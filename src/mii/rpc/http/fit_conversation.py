"""``truncation: "auto"`` of the Responses API: a conversation longer than the
context window loses its oldest turns, never its instructions.

OpenAI fits such a conversation by dropping input items; the instructions (the
system and developer messages it starts with) and the last item stay. Items go
whole and in order: first the oldest turns (a user message with the answers and
tool results after it), then, within the last turn (an agent's long tool loop),
its oldest answers with their tool results, so that what is left starts as a
conversation does (instructions, then a user message) and no tool result loses
its call. What still does not fit (one huge message) is cut to its last tokens
by the engine (``truncate_prompt_tokens``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

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
    longer than this cannot fit, so such conversations are not rendered (a huge one
    costs what a fitting one does)."""
    candidates = shortened(messages)
    first = 0
    if max_chars is not None:
        while first < len(candidates) - 1 and content_chars(candidates[first]) > max_chars:
            first += 1
    # The prompt shrinks as items go: the first candidate that fits, by bisection.
    low, high = first, len(candidates) - 1
    best: list[int] | None = None
    while low <= high:
        middle = (low + high) // 2
        ids = render(candidates[middle])
        if len(ids) <= limit:
            best, high = ids, middle - 1
        else:
            low = middle + 1
    return best if best is not None else render_end(candidates[-1])


def shortened(messages: list[ChatMessage]) -> list[list[ChatMessage]]:
    """``messages``, then each shorter conversation that truncation may leave, in
    order: less its oldest turns, then less the last turn's oldest answers."""
    head = 0
    while head < len(messages) and messages[head].role in INSTRUCTION_ROLES:
        head += 1
    instructions, rest = messages[:head], messages[head:]
    turns = _split(rest, lambda m: m.role == "user")
    candidates = [instructions + _joined(turns[k:]) for k in range(len(turns))]
    if turns:  # the last turn: its opening message, then answers with their results
        last = turns[-1]
        opening, answers = last[:1], _split(last[1:], lambda m: m.role == "assistant")
        candidates += [
            instructions + opening + _joined(answers[k:]) for k in range(1, len(answers))
        ]
    return candidates or [messages]


def _split(
    messages: Sequence[ChatMessage], starts: Callable[[ChatMessage], bool]
) -> list[list[ChatMessage]]:
    """``messages`` in groups, each begun by a message that ``starts`` one (the
    first group also by whatever comes before the first such message)."""
    groups: list[list[ChatMessage]] = []
    for message in messages:
        if not groups or starts(message):
            groups.append([])
        groups[-1].append(message)
    return groups


def _joined(groups: list[list[ChatMessage]]) -> list[ChatMessage]:
    return [message for group in groups for message in group]
