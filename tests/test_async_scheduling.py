"""Async scheduling: pass N+1 is launched before pass N's tokens are read back.

The engine then learns that a request ended (end-of-sequence, stop string)
one pass late. These tests drive ``EngineCore`` directly and check that what
each request receives is exactly what synchronous scheduling gives: the same
pieces, nothing after the final one, every KV block returned.
"""

from __future__ import annotations

import pytest

from helpers import PROMPTS
from mii.config import EngineConfig, GenerateParams
from mii.engine.core import EngineCore
from mii.engine.sequence import PENDING_TOKEN

OPTIONS = dict(kv_block_size=4, num_kv_blocks=48, token_budget=8, max_num_seqs=4)


def make_core(model: str, async_scheduling: bool, **options) -> EngineCore:
    return EngineCore(
        EngineConfig(model=model, async_scheduling=async_scheduling, **{**OPTIONS, **options})
    )


def run_to_end(core: EngineCore, requests: dict[str, tuple[str, dict]]) -> dict[str, list]:
    """Submit every request, step until idle; each request's pieces in order."""
    for request_id, (prompt, params) in requests.items():
        seq = core.make_sequence(request_id, prompt, GenerateParams.parse(**params))
        assert core.add(seq) is None
    pieces: dict[str, list] = {rid: [] for rid in requests}
    while core.has_work():
        for out in core.step():
            assert out.error is None, out.error
            received = pieces[out.request_id]
            assert not received or received[-1].finish_reason is None, (
                f"{out.request_id} received a piece after its final one"
            )
            received.append(out.piece)
    assert core.blocks.num_free == core.blocks.num_blocks
    assert not core.sequences
    return pieces


def summary(pieces: list) -> tuple:
    return (
        [p.generated_text for p in pieces],
        [p.token_ids for p in pieces],
        [p.generated_length for p in pieces],
        pieces[-1].finish_reason,
    )


def test_same_pieces_as_synchronous_scheduling(llama):
    full = run_to_end(
        make_core(llama, False), {"g": (PROMPTS[0], {"do_sample": False, "max_new_tokens": 16})}
    )
    text = "".join(p.generated_text for p in full["g"])
    assert len(text) > 6
    stop = text[3:6]  # ends the request mid-stream, a pass before its length limit
    requests = {
        "stop": (PROMPTS[0], {"do_sample": False, "max_new_tokens": 16, "stop": [stop]}),
        "sampled": (PROMPTS[1], {"seed": 7, "max_new_tokens": 12}),
        "short": (PROMPTS[2], {"do_sample": False, "max_new_tokens": 1}),
        "min-tokens": (PROMPTS[3], {"seed": 3, "min_new_tokens": 5, "max_new_tokens": 9}),
        "full-text": (
            PROMPTS[4],
            {"do_sample": False, "max_new_tokens": 10, "return_full_text": True},
        ),
    }
    expected = run_to_end(make_core(llama, False), requests)
    got = run_to_end(make_core(llama, True), requests)
    for request_id in requests:
        assert summary(got[request_id]) == summary(expected[request_id]), request_id
    assert expected["stop"][-1].finish_reason == "stop"
    assert expected["stop"][-1].generated_length < 16


def test_next_pass_is_launched_before_tokens_are_read(llama):
    core = make_core(llama, True)
    seq = core.make_sequence("a", PROMPTS[0], GenerateParams.parse(max_new_tokens=4))
    core.add(seq)
    first = core.step()  # the whole prompt fits the budget: pass 1 samples, unread
    assert first == [] and core.has_work()
    assert seq.token_ids[-1] == PENDING_TOKEN and seq.pending_row == 0
    second = core.step()  # launches pass 2 (input read on the device), reads pass 1
    assert [o.piece.generated_length for o in second] == [1]
    assert seq.token_ids[-1] == PENDING_TOKEN and seq.token_ids[-2] != PENDING_TOKEN


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_abort_while_a_pass_is_in_flight(llama, async_scheduling):
    core = make_core(llama, async_scheduling)
    for rid in ("keep", "drop"):  # ignore_eos: a sampled end of text would end it early
        params = GenerateParams.parse(max_new_tokens=6, ignore_eos=True)
        core.add(core.make_sequence(rid, PROMPTS[2], params))
    core.step()
    core.step()
    assert core.abort("drop")
    received = []
    while core.has_work():
        received += core.step()
    assert {o.request_id for o in received} == {"keep"}
    assert received[-1].piece.finish_reason == "length"
    assert core.blocks.num_free == core.blocks.num_blocks
