"""examples/fastapi_app.py, the AsyncEngine embedded in a user's FastAPI app: its
routes answer as the pipeline does, and what the engine refuses is an error status."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

import mii

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "fastapi_app.py"
PROMPT = "DeepSpeed is"


@pytest.fixture
def client(llama, monkeypatch):
    monkeypatch.setenv("MII_MODEL", str(llama))
    spec = importlib.util.spec_from_file_location("fastapi_app_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with TestClient(module.app) as client:  # runs the lifespan: loads, then closes
        yield client


def test_the_example_streams_and_refuses_with_a_status(client, llama):
    with mii.pipeline(llama) as pipe:
        expected = pipe(PROMPT, max_new_tokens=6, do_sample=False)[0].generated_text
    body = {"prompt": PROMPT, "max_new_tokens": 6, "do_sample": False}
    answer = client.post("/generate", json=body)
    assert answer.status_code == 200 and answer.json()["text"] == expected
    streamed = client.post("/stream", json=body)
    assert streamed.status_code == 200 and streamed.text == expected
    # A prompt longer than the model's length: 400 naming it, before the stream
    # starts (it was a 200 whose body broke off, and a traceback in the server's log).
    too_long = client.post("/stream", json={**body, "prompt": "word " * 400})
    assert too_long.status_code == 400 and too_long.json()["field"] == "prompt", too_long.text
    bad_option = client.post("/stream", json={**body, "top_p": 0})
    assert bad_option.status_code == 400 and bad_option.json()["field"] == "top_p"
    assert client.get("/stats").json()["running"] == 0


def test_the_example_answers_a_conversation_through_the_chat_template(client, llama):
    turn = [{"role": "user", "content": PROMPT}]
    with mii.pipeline(llama) as pipe:
        [expected] = pipe.chat(turn, max_new_tokens=6, do_sample=False)
    body = {"messages": turn, "max_new_tokens": 6, "do_sample": False}
    answer = client.post("/chat", json=body)
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"role": "assistant", "content": expected.generated_text}
    bad = client.post("/chat", json={**body, "messages": [{"content": "no role"}]})
    assert bad.status_code == 400 and bad.json()["field"].startswith("messages"), bad.text
    # an option the route does not take is refused, not ignored (max_tokens: OpenAI's name)
    assert client.post("/chat", json={**body, "max_tokens": 2}).status_code == 422
    assert client.post("/generate", json={"prompt": PROMPT, "max_tokens": 2}).status_code == 422
