"""AsyncEngine.chat and AsyncEngine.stream_chat: conversations through the model's
chat template, answered as generate / stream answer the template's token ids."""

from __future__ import annotations

import threading

import pytest

import mii
from chat_tokenizers import CHATML_TEMPLATE

GREEDY = dict(do_sample=False, max_new_tokens=6, ignore_eos=True)
TURN = [{"role": "user", "content": "Seattle is"}]
OTHER = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "DeepSpeed is"},
]


@pytest.fixture
async def engine(llama):
    async with mii.AsyncEngine(llama, kv_block_size=4, num_kv_blocks=64) as eng:
        eng.tokenizer.chat_template = CHATML_TEMPLATE
        yield eng


def template_ids(tokenizer, messages, **options) -> list[int]:
    options.setdefault("add_generation_prompt", True)
    encoded = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **options)
    return list(encoded["input_ids"])


async def test_chat_answers_as_generate_answers_the_templates_ids(engine):
    tok = engine.tokenizer
    expected = await engine.generate([template_ids(tok, TURN), template_ids(tok, OTHER)], **GREEDY)
    one = await engine.chat(TURN, **GREEDY)  # one conversation
    both = await engine.chat([TURN, OTHER], **GREEDY)  # a list of them, in order
    assert [r.token_ids for r in one] == [expected[0].token_ids]
    assert [r.token_ids for r in both] == [r.token_ids for r in expected]
    assert [r.prompt_length for r in both] == [len(template_ids(tok, m)) for m in (TURN, OTHER)]
    # the template options reach the template
    partial = [*TURN, {"role": "assistant", "content": "a city"}]
    [continued] = await engine.chat(partial, continue_final_message=True, **GREEDY)
    ids = template_ids(tok, partial, add_generation_prompt=False, continue_final_message=True)
    assert continued.prompt_length == len(ids)
    [plain] = await engine.generate(ids, **GREEDY)
    assert continued.token_ids == plain.token_ids


async def test_stream_chat_pieces_join_to_the_chat_answer(engine):
    [whole] = await engine.chat(OTHER, **GREEDY)
    pieces = [piece async for piece in engine.stream_chat(OTHER, **GREEDY)]
    assert len(pieces) > 1
    assert "".join(p.generated_text for p in pieces) == whole.generated_text
    assert [t for p in pieces for t in p.token_ids] == whole.token_ids
    assert pieces[-1].finish_reason == "length"
    # a list holding one conversation is that conversation
    again = [piece async for piece in engine.stream_chat([OTHER], **GREEDY)]
    assert [t for p in again for t in p.token_ids] == whole.token_ids


async def test_bad_conversations_are_refused_naming_messages(engine):
    for bad in ([], "Seattle is", [{"content": "no role"}], [TURN, []]):
        with pytest.raises(mii.InvalidRequestError) as err:
            await engine.chat(bad, **GREEDY)
        assert err.value.field.startswith("messages"), err.value
    with pytest.raises(mii.InvalidRequestError, match="needs its content") as err:
        await engine.chat([{"role": "user"}], **GREEDY)  # (generated from "None": a trial)
    assert err.value.field == "messages.0.content"
    with pytest.raises(mii.InvalidRequestError, match="one conversation, got 2") as err:
        async for _ in engine.stream_chat([TURN, OTHER], **GREEDY):
            pass
    assert err.value.field == "messages"
    with pytest.raises(mii.InvalidRequestError) as err:
        await engine.chat(TURN, continue_final_message=True, add_generation_prompt=True)
    assert err.value.field == "continue_final_message"
    with pytest.raises(mii.InvalidRequestError) as err:  # generation options as generate's
        await engine.chat(TURN, max_new_tokens=-1)
    assert err.value.field == "max_new_tokens"
    for bad in ("x", ["a"], {1: 2}):  # (a TypeError from deep inside the template call)
        with pytest.raises(mii.InvalidRequestError) as err:
            await engine.chat(TURN, chat_template_kwargs=bad, **GREEDY)
        assert err.value.field == "chat_template_kwargs"
    # (the template's error named messages; a nameless dict vanished without a word)
    for bad in ({"name": "x"}, "abc", [1], [{"nonsense": 1}], [{"function": {"x": 1}}]):
        with pytest.raises(mii.InvalidRequestError, match="tools must be a list") as err:
            await engine.chat(TURN, tools=bad, **GREEDY)
        assert err.value.field == "tools"
    [fine] = await engine.chat(TURN, **GREEDY)  # the engine is unharmed
    assert fine.generated_length == GREEDY["max_new_tokens"]


async def test_a_large_conversation_is_templated_off_the_event_loop(engine, monkeypatch):
    """A conversation of 40k characters has its template applied in a worker thread
    (as long text prompts are tokenized): the event loop keeps running meanwhile."""
    import mii.async_chat as chat_methods

    threads = []
    real = chat_methods.chat_prompt_batch

    def recording(*args, **kwargs):
        threads.append(threading.current_thread())
        return real(*args, **kwargs)

    monkeypatch.setattr(chat_methods, "chat_prompt_batch", recording)
    large = [{"role": "user", "content": "Seattle is a city. " * 2000}]
    [answer] = await engine.chat(large, **GREEDY, truncate_prompt_tokens=32)
    [small] = await engine.chat(TURN, **GREEDY)
    assert threads[0] is not threading.main_thread()  # offloaded
    assert threads[1] is threading.main_thread()  # a small one is not worth a thread hop
    # Many short ones are (300 stalled the loop 184 ms: a trial); a few are not.
    await engine.chat([TURN] * 8, **GREEDY)
    await engine.chat([TURN] * 2, **GREEDY)
    assert threads[2] is not threading.main_thread() and threads[3] is threading.main_thread()
    long_chat = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": "hi"} for i in range(65)
    ]
    await engine.chat(long_chat, **GREEDY, truncate_prompt_tokens=32)  # many short turns
    assert threads[4] is not threading.main_thread()
    assert answer.prompt_length == 32 and small.generated_length == GREEDY["max_new_tokens"]


async def test_a_tool_calling_conversation_goes_to_the_template(engine):
    """An assistant's tool_calls and a tool result's tool_call_id were refused as
    misspellings of each other ("unknown key 'tool_calls' (did you mean
    'tool_call_id'?)"), where the OpenAI chat route takes the same messages."""
    conversation = [
        {"role": "user", "content": "What's the weather in Paris?"},
        {
            "role": "assistant",
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny, 21C"},
    ]
    [answer] = await engine.chat(conversation, **GREEDY)
    assert answer.generated_length == GREEDY["max_new_tokens"]
    [alone] = await engine.chat(conversation[2:], **GREEDY)
    assert alone.generated_length == GREEDY["max_new_tokens"]


async def test_tools_a_template_ignores_are_said_once(engine, monkeypatch, caplog):
    """A chat template that never reads tools drops them from the prompt: the OpenAI
    route logged it, engine.chat said nothing (user trial)."""
    import mii.rpc.http.tools as tools_module

    monkeypatch.setattr(tools_module, "_warned_templates", set())
    assert "tools" not in engine.tokenizer.chat_template  # (the ChatML template here)
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {}}}
    with caplog.at_level("WARNING"):
        for _ in range(2):
            await engine.chat(TURN, tools=[tool], **GREEDY)
    said = [r for r in caplog.records if "does not use tools" in r.getMessage()]
    assert len(said) == 1
    assert "tokenizer.chat_template" in said[0].getMessage()  # (Python's way, not a flag's)
