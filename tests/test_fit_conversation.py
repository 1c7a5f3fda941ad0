"""truncation "auto" (the Responses API) over a fake template: a message's tokens
are its words plus one, so the tests count what fits. The gateway test
(test_responses_api) checks the real template and route."""

from __future__ import annotations

import time

from mii.rpc.http.fit_conversation import Candidates, fitted_prompt
from mii.rpc.http.protocol import ChatMessage


def msg(role: str, words: int = 1, tag: str = "") -> ChatMessage:
    return ChatMessage(role=role, content=" ".join([tag or role] * words))


class Template:
    """Renders a conversation as one token per word and one per message; counts calls."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def render(self, messages: list[ChatMessage]) -> list[int]:
        self.calls.append(len(messages))
        return [0] * sum(len(m.content.split()) + 1 for m in messages)

    def render_end(self, messages: list[ChatMessage]) -> list[int]:
        self.calls.append(-len(messages))  # (negative: the end only)
        return [1]


def tags(messages: list[ChatMessage]) -> list[str]:
    return [m.content.split()[0] for m in messages]


def test_a_conversation_that_fits_is_rendered_once_and_whole():
    template = Template()
    talk = [msg("system", 3), msg("user", 5), msg("assistant", 5), msg("user", 5)]
    assert len(fitted_prompt(template.render, template.render_end, talk, 100)) == 22
    assert template.calls == [4]


def test_the_oldest_turns_go_first_and_the_instructions_stay():
    template = Template()
    talk = [msg("system", 3, "sys")]
    for i in range(6):
        talk += [msg("user", 9, f"q{i}"), msg("assistant", 9, f"a{i}")]
    talk.append(msg("user", 9, "last"))
    limit = 4 + 4 * 10 + 10  # instructions, two whole turns, the last question
    candidates = Candidates(talk)
    ids = fitted_prompt(template.render, template.render_end, talk, limit)
    assert len(ids) == limit
    kept = next(c for c in (candidates[i] for i in range(len(candidates))) if len(c) == 6)
    assert tags(kept) == ["sys", "q4", "a4", "q5", "a5", "last"]
    assert len(template.calls) <= 5  # whole, then a bisection over 7 candidates


def test_a_tool_loop_loses_its_oldest_calls_with_their_results():
    talk = [msg("developer", 2, "inst"), msg("user", 2, "task")]
    for i in range(5):
        talk += [msg("assistant", 2, f"call{i}"), msg("tool", 20, f"out{i}")]
    candidates = Candidates(talk)
    shapes = [tags(candidates[i]) for i in range(len(candidates))]
    assert shapes[0] == tags(talk)
    assert shapes[1] == ["inst", "task", "call1", "out1", "call2", "out2", "call3", "out3",
                         "call4", "out4"]  # fmt: skip
    assert shapes[-1] == ["inst", "task", "call4", "out4"]  # the task and the last call stay


def test_a_conversation_that_opens_with_a_call_keeps_its_result_with_it():
    """No user message: the opening call keeps its result (it lost it: a review)."""
    talk = [msg("assistant", 1, "c0"), msg("tool", 1, "r0"), msg("assistant", 1, "c1")]
    talk += [msg("tool", 1, "r1"), msg("assistant", 1, "c2"), msg("tool", 1, "r2")]
    candidates = Candidates(talk)
    shapes = [tags(candidates[i]) for i in range(len(candidates))]
    assert shapes == [tags(talk), ["c0", "r0", "c2", "r2"]]


def test_text_past_max_chars_is_never_rendered_whole():
    """A huge last message was rendered whole before its end was cut (22 s for 8 MB:
    a review); text longer than max_chars cannot fit and goes straight to the end."""
    template = Template()
    huge = [msg("system", 2), msg("user", 50_000)]
    fitted_prompt(template.render, template.render_end, huge, 1_000, max_chars=20_000)
    assert template.calls == [-2]
    # Oldest turns past max_chars are left out before anything is rendered.
    template.calls.clear()
    talk = [msg("user", 50_000, "big"), msg("assistant", 50_000, "big"), msg("user", 5, "q")]
    ids = fitted_prompt(template.render, template.render_end, talk, 1_000, max_chars=20_000)
    assert len(ids) == 6 and template.calls == [1]


def test_many_items_cost_linear_time_and_memory():
    """Every candidate was built up front: 8,000 turns took 2.5 s and 565 MB (a review)."""
    talk = [msg("system")] + [msg("user" if i % 2 == 0 else "assistant") for i in range(100_000)]
    template = Template()
    started = time.perf_counter()
    candidates = Candidates(talk)
    fitted_prompt(template.render, template.render_end, talk, 10, max_chars=10**9)
    assert len(candidates) == 50_000
    assert len(template.calls) <= 18  # whole, then a bisection: log2(50,000) + 2
    assert time.perf_counter() - started < 30  # (quadratic: hours)
