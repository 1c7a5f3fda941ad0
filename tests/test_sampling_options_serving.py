"""Sampling options through every server surface (issue 16, item 4): OpenAI's
``/v1/completions`` and ``/v1/chat/completions`` (penalties, ``logit_bias`` with
string keys, vLLM's ``repetition_penalty``, ``min_p``, ``stop_token_ids``,
``skip_special_tokens``, and the chat template options), mii's REST route and
gRPC; invalid values are a 400 / INVALID_ARGUMENT naming the field.

One deployment (one replica) serves a tiny Llama whose ChatML template knows an
``enable_thinking`` variable; an in-process pipeline on the same checkpoint gives
the expected answers.
"""

from __future__ import annotations

import grpc
import httpx
import openai
import pytest

import mii
from chat_tokenizers import chatml_tokenizer
from helpers import save_checkpoint, served_deployment, tiny_config
from mii.errors import InvalidRequestError
from mii.rpc import mii_pb2, mii_pb2_grpc
from mii.rpc.status import FIELD_METADATA

NEW = 10
PROMPT = "DeepSpeed is"
# ChatML with a thinking switch, as Qwen3's template has.
TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and enable_thinking %}{{ 'think: ' }}{% endif %}"
    "{% endif %}"
)
USER = [{"role": "user", "content": "Seattle is"}]
PARTIAL = [*USER, {"role": "assistant", "content": "a city"}]


@pytest.fixture(scope="module")
def tok():
    tok = chatml_tokenizer()
    tok.chat_template = TEMPLATE
    return tok


@pytest.fixture(scope="module")
def model_path(tmp_path_factory, tok):
    path = tmp_path_factory.mktemp("sampling-options-llama")
    save_checkpoint(path, tiny_config("llama", tok), tok)
    return str(path)


@pytest.fixture(scope="module")
def pipe(model_path):
    with mii.pipeline(model_path, max_num_seqs=4) as p:
        yield p


@pytest.fixture(scope="module")
def served(model_path, tmp_path_factory):
    cache = tmp_path_factory.mktemp("mii-cache")
    with served_deployment(model_path, cache, "sampling-options", max_num_seqs=4) as deployment:
        yield deployment


def greedy(pipe, prompt, **options) -> mii.Response:
    return pipe([prompt], do_sample=False, max_new_tokens=NEW, **options)[0]


def template_ids(tok, messages, **options) -> list[int]:
    options.setdefault("add_generation_prompt", True)
    encoded = tok.apply_chat_template(messages, tokenize=True, return_dict=True, **options)
    return list(encoded["input_ids"])


def test_openai_routes_apply_the_options(served, pipe, tok):
    forced = tok.convert_tokens_to_ids("<|im_start|>")  # a special token
    stop = greedy(pipe, PROMPT).token_ids[2]
    cases = [  # (OpenAI extra fields, mii options)
        ({"repetition_penalty": 0.5}, {"repetition_penalty": 0.5}),
        (
            {"presence_penalty": -2.0, "frequency_penalty": -1.0},
            {"presence_penalty": -2.0, "frequency_penalty": -1.0},
        ),
        ({"logit_bias": {str(forced): 100}}, {"logit_bias": {forced: 100}}),
        (
            {"logit_bias": {str(forced): 100}, "skip_special_tokens": False},
            {"logit_bias": {forced: 100}, "skip_special_tokens": False},
        ),
        ({"allowed_token_ids": [forced, 7, 11]}, {"allowed_token_ids": [forced, 7, 11]}),
        ({"min_tokens": 3, "stop_token_ids": [stop]}, {"min_tokens": 3, "stop_token_ids": [stop]}),
        ({"stop_token_ids": [stop], "min_p": 0.3}, {"stop_token_ids": [stop], "min_p": 0.3}),
    ]
    plain = greedy(pipe, PROMPT)
    for extra, options in cases:
        want = greedy(pipe, PROMPT, **options)
        assert want.token_ids != plain.token_ids or "min_p" in extra, extra  # guard
        completion = served.oai.completions.create(
            model=served.name, prompt=PROMPT, max_tokens=NEW, temperature=0, extra_body=extra
        )
        choice = completion.choices[0]
        assert choice.text == want.generated_text, extra
        assert choice.finish_reason == want.finish_reason, extra
        assert completion.usage.completion_tokens == want.generated_length, extra
    assert choice.finish_reason == "stop"  # the last case: ended by the stop token
    shown = greedy(pipe, PROMPT, logit_bias={forced: 100}, skip_special_tokens=False)
    assert shown.generated_text == "<|im_start|>" * NEW

    # The chat route maps the same options.
    ids = template_ids(tok, USER)
    want = greedy(pipe, ids, repetition_penalty=0.5, logit_bias={stop: -100})
    chat = served.oai.chat.completions.create(
        model=served.name,
        messages=USER,
        max_tokens=NEW,
        temperature=0,
        logit_bias={str(stop): -100},
        extra_body={"repetition_penalty": 0.5},
    )
    assert chat.choices[0].message.content == want.generated_text
    assert chat.usage.prompt_tokens == len(ids)


def test_chat_template_options(served, pipe, tok):
    cases = [  # (request fields, apply_chat_template options)
        ({"chat_template_kwargs": {"enable_thinking": True}}, {"enable_thinking": True}),
        ({"add_generation_prompt": False}, {"add_generation_prompt": False}),
    ]
    for extra, options in cases:
        ids = template_ids(tok, USER, **options)
        assert ids != template_ids(tok, USER)  # guard: the option changes the prompt
        want = greedy(pipe, ids)
        chat = served.oai.chat.completions.create(
            model=served.name, messages=USER, max_tokens=NEW, temperature=0, extra_body=extra
        )
        assert chat.usage.prompt_tokens == len(ids), extra
        assert chat.choices[0].message.content == want.generated_text, extra
    # The answer continues the final (assistant) message, left open.
    ids = template_ids(tok, PARTIAL, add_generation_prompt=False, continue_final_message=True)
    assert tok.decode(ids).endswith("a city")
    want = greedy(pipe, ids)
    # add_generation_prompt left out: false when the final message continues.
    for extra in (
        {"add_generation_prompt": False, "continue_final_message": True},
        {"continue_final_message": True},
    ):
        chat = served.oai.chat.completions.create(
            model=served.name, messages=PARTIAL, max_tokens=NEW, temperature=0, extra_body=extra
        )
        assert chat.usage.prompt_tokens == len(ids), extra
        assert chat.choices[0].message.content == want.generated_text, extra


def assert_400(response: httpx.Response, param: str) -> None:
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param, response.text


def test_invalid_values_are_refused_naming_the_field(served, pipe):
    vocab = pipe.engine.core.vocab_size
    completion = {"model": served.name, "prompt": PROMPT, "max_tokens": 2}
    chat = {"model": served.name, "messages": USER, "max_tokens": 2}
    bad = [
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"repetition_penalty": -1.5}, "repetition_penalty"),
        ({"min_p": 1.5}, "min_p"),
        ({"min_p": -0.1}, "min_p"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"logit_bias": {"five": 1}}, "logit_bias"),
        ({"logit_bias": {str(vocab): 1}}, "logit_bias"),  # refused by the engine
        ({"stop_token_ids": [vocab + 1]}, "stop_token_ids"),
        ({"allowed_token_ids": [1, vocab]}, "allowed_token_ids"),  # refused by the engine
        ({"allowed_token_ids": [-1]}, "allowed_token_ids"),
    ]
    for extra, param in bad:
        for route, body in (("/v1/completions", completion), ("/v1/chat/completions", chat)):
            assert_400(served.http.post(route, json={**body, **extra}), param)
        with pytest.raises(openai.BadRequestError) as err:
            served.oai.completions.create(
                model=served.name, prompt=PROMPT, max_tokens=2, extra_body=extra
            )
        assert err.value.body["param"] == param
    # Refused by the replica's engine, streamed: still a 400 before any event.
    streamed = {**completion, "stream": True, "logit_bias": {str(vocab): 1}}
    assert_400(served.http.post("/v1/completions", json=streamed), "logit_bias")
    for extra, param in (
        ({"add_generation_prompt": True, "continue_final_message": True}, "continue_final_message"),
        ({"chat_template_kwargs": {"tokenize": False}}, "chat_template_kwargs"),
    ):
        assert_400(served.http.post("/v1/chat/completions", json={**chat, **extra}), param)
    # The deployment still serves.
    ok = served.http.post("/v1/completions", json={**completion, "ignore_eos": True})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def test_rest_route_and_grpc(served, pipe):
    options = {"repetition_penalty": 0.6, "presence_penalty": -1.0, "min_tokens": 4}
    want = greedy(pipe, PROMPT, **options)
    assert want.token_ids != greedy(pipe, PROMPT).token_ids  # guard: the options matter
    # mii's REST route: JSON keys of logit_bias are strings.
    url = f"/mii/{served.name}"
    body = {"prompts": [PROMPT], "do_sample": False, "max_new_tokens": NEW, **options}
    response = served.http.post(url, json=body)
    assert response.status_code == 200, response.text
    assert response.json()[0]["token_ids"] == want.token_ids
    forced = served.http.post(url, json={**body, "logit_bias": {"9": 100}})
    assert forced.json()[0]["token_ids"] == [9] * NEW
    for extra, field in (
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"min_p": 2}, "min_p"),
    ):
        refused = served.http.post(url, json={**body, **extra})
        assert refused.status_code == 400 and refused.json()["error"]["field"] == field

    # mii.client (gRPC): the same answers, and errors naming the field.
    got = served.client.generate([PROMPT], do_sample=False, max_new_tokens=NEW, **options)[0]
    assert got.token_ids == want.token_ids
    stop = want.token_ids[5]
    ended = served.client.generate(
        [PROMPT], do_sample=False, max_new_tokens=NEW, stop_token_ids=[stop], **options
    )[0]
    assert ended.finish_reason == "stop" and ended.token_ids == want.token_ids[:6]
    for extra, field in (
        ({"logit_bias": {5: 200}}, "logit_bias"),
        ({"frequency_penalty": 9}, "frequency_penalty"),
        ({"logit_bias": {10**6: 1}}, "logit_bias"),  # refused by the replica's engine
    ):
        with pytest.raises(InvalidRequestError) as err:
            served.client.generate([PROMPT], max_new_tokens=2, **extra)
        assert err.value.field == field

    # Raw gRPC: the typed fields 20-27, min_tokens as another name of min_new_tokens.
    with grpc.insecure_channel(served.client.address) as channel:
        stub = mii_pb2_grpc.MiiStub(channel)
        options_pb = mii_pb2.GenerationOptions(
            do_sample=False,
            max_new_tokens=NEW,
            repetition_penalty=0.6,
            presence_penalty=-1.0,
            min_tokens=4,
        )
        reply = stub.Generate(mii_pb2.GenerateRequest(prompts=[PROMPT], options=options_pb))
        assert list(reply.responses[0].token_ids) == want.token_ids
        for bad, field in (
            (mii_pb2.GenerationOptions(repetition_penalty=0), "repetition_penalty"),
            (mii_pb2.GenerationOptions(min_p=-1), "min_p"),
            (mii_pb2.GenerationOptions(logit_bias={3: -101}), "logit_bias"),
            (mii_pb2.GenerationOptions(min_tokens=3, min_new_tokens=2), "min_tokens"),
        ):
            with pytest.raises(grpc.RpcError) as err:
                stub.Generate(mii_pb2.GenerateRequest(prompts=[PROMPT], options=bad))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert dict(err.value.trailing_metadata())[FIELD_METADATA] == field
