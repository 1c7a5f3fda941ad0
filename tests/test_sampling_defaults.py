"""The OpenAI routes take the model's generation_config.json sampling as the defaults
of the fields a request leaves out (vllm serve's --generation-config auto); with
generation_config="vllm", OpenAI's defaults."""

from __future__ import annotations

import json
import shutil

import pytest

from mii.cli.commands import build_parser
from mii.cli.serve import serve_config
from mii.config import EngineConfig
from mii.errors import InvalidRequestError
from mii.rpc.deployment_config import DeploymentConfig
from mii.rpc.http.protocol import ChatCompletionRequest, CompletionRequest
from mii.rpc.http.sampling_defaults import load_sampling_defaults, with_sampling_defaults
from scripted_gateway import ScriptedPool, with_gateway

RECOMMENDED = {
    "do_sample": True,
    "temperature": 0.6,
    "top_p": 0.9,
    "top_k": 20,
    "max_new_tokens": 7,
}


@pytest.fixture
def recommending(llama, tmp_path):
    """A copy of the tiny checkpoint whose generation_config.json recommends sampling."""
    model = tmp_path / "model"
    shutil.copytree(llama, model)
    path = model / "generation_config.json"
    config = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**config, **RECOMMENDED}))
    return model


def test_the_defaults_come_from_the_models_generation_config(recommending, llama):
    engine = EngineConfig.parse(str(recommending))
    expected = {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "max_tokens": 7}
    assert load_sampling_defaults(engine, "auto") == expected
    assert load_sampling_defaults(engine, str(recommending)) == expected  # a folder
    assert load_sampling_defaults(engine, "vllm") == {}
    assert load_sampling_defaults(engine, "none") == {}
    # transformers' save_pretrained writes no sampling values: nothing changes
    assert load_sampling_defaults(EngineConfig.parse(llama), "auto") == {}


def test_a_request_keeps_what_it_sets_and_gets_the_rest():
    defaults = {"temperature": 0.6, "top_p": 0.9, "max_tokens": 7}
    body = with_sampling_defaults(CompletionRequest(model="m", prompt="x"), defaults)
    assert (body.temperature, body.top_p, body.max_tokens) == (0.6, 0.9, 16)  # OpenAI's, as vLLM
    body = CompletionRequest(model="m", prompt="x", max_tokens=None)
    assert with_sampling_defaults(body, defaults).max_tokens == 7
    chat = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}])
    assert with_sampling_defaults(chat, defaults).max_tokens == 7
    body = CompletionRequest(model="m", prompt="x", temperature=0, top_p=None, max_tokens=3)
    body = with_sampling_defaults(body, defaults)
    assert (body.temperature, body.top_p, body.max_tokens) == (0, 0.9, 3)
    chat = ChatCompletionRequest(
        model="m", messages=[{"role": "user", "content": "x"}], max_completion_tokens=2
    )
    chat = with_sampling_defaults(chat, defaults)
    assert (chat.max_tokens, chat.max_completion_tokens, chat.temperature) == (None, 2, 0.6)


def test_the_option_and_its_flag(recommending, tmp_path):
    parse = build_parser().parse_args
    assert serve_config(parse(["serve", "m"])).generation_config == "auto"
    assert serve_config(parse(["serve", "m", "--generation-config", "vllm"])).generation_config == (
        "vllm"
    )
    config = serve_config(parse(["serve", "m", "--generation-config", str(recommending)]))
    assert config.generation_config == str(recommending)
    with pytest.raises(InvalidRequestError) as err:
        DeploymentConfig.parse("m", generation_config=str(tmp_path / "nowhere"))
    assert err.value.field == "generation_config" and "'auto', 'vllm'" in str(err.value)


@pytest.mark.parametrize("generation_config", ["auto", "vllm"])
def test_the_gateway_sends_the_recommended_sampling(recommending, generation_config):
    pool = ScriptedPool("an answer")

    async def scenario(client, gateway):
        await client.completions.create(model=str(recommending), prompt="Hi")
        await client.completions.create(
            model=str(recommending), prompt="Hi", temperature=1.0, top_p=0.5, max_tokens=4
        )
        await client.chat.completions.create(
            model=str(recommending), messages=[{"role": "user", "content": "Hi"}]
        )
        # The Responses object reports what sampled (it echoed the request's nulls)
        reported = await client.responses.create(model=str(recommending), input="Hi")
        reported_sampling.append((reported.temperature, reported.top_p))

    reported_sampling = []
    with_gateway(str(recommending), pool, scenario, generation_config=generation_config)
    (_, plain), (_, chosen), (_, chat), (_, responses) = pool.sent
    expected = (0.6, 0.9) if generation_config == "auto" else (1.0, 1.0)
    assert reported_sampling == [expected]
    assert (responses.get("temperature", 1.0), responses["top_p"]) == expected
    if generation_config == "auto":
        for params in (plain, chat):
            assert (params["temperature"], params["top_p"], params["top_k"]) == (0.6, 0.9, 20)
        assert (plain["max_new_tokens"], chat["max_new_tokens"]) == (16, 7)
    else:  # OpenAI's defaults: temperature 1 (mii's own sampling), top_p 1, completions 16 tokens
        assert "temperature" not in plain and "top_k" not in plain
        assert plain["top_p"] == 1.0 and plain["max_new_tokens"] == 16
    assert (chosen["temperature"], chosen["top_p"], chosen["max_new_tokens"]) == (1.0, 0.5, 4)
    assert chosen["top_k"] == 20 if generation_config == "auto" else "top_k" not in chosen


def test_an_unreadable_generation_config_warns_and_changes_nothing(recommending, capsys):
    from mii.rpc.http.sampling_defaults import gateway_sampling_defaults

    config = DeploymentConfig.parse(str(recommending))
    assert gateway_sampling_defaults(config)["temperature"] == 0.6
    assert "defaults for fields a request leaves out" in capsys.readouterr().err
    (recommending / "generation_config.json").write_text("{not json")
    assert gateway_sampling_defaults(config) == {}
    err = capsys.readouterr().err
    assert "warning: the generation config (auto) cannot be read" in err
