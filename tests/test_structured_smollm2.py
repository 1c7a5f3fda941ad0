"""Structured output with the real SmolLM2-135M-Instruct and real clients (issue 18,
item 5): the ``openai`` SDK's ``chat.completions.parse`` with a pydantic model, and
LangChain's ``with_structured_output`` (its default method, json_schema, and
json_mode), against one deployment of the demo model on loopback.
"""

from __future__ import annotations

import json
import uuid
from typing import Literal

import openai
import pytest
from pydantic import BaseModel, Field

import mii
from mii.rpc.deployment import free_port

QUESTION = "Invent a fictional person. Give their name, age and favourite colour."
MAX_TOKENS = 120


class Person(BaseModel):
    name: str = Field(max_length=24)
    age: int = Field(ge=0, le=120)
    colour: Literal["red", "green", "blue", "other"]


@pytest.fixture(scope="module")
def base_url(smollm2, tmp_path_factory):
    """One deployment of the real model for the module: its OpenAI base URL."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MII_CACHE_DIR", str(tmp_path_factory.mktemp("smollm2-structured")))
        rest_port = free_port()
        client = mii.serve(
            smollm2,
            deployment_name=f"smollm2-structured-{uuid.uuid4().hex[:8]}",
            enable_restful_api=True,
            restful_api_port=rest_port,
            port=free_port(),
            device="cpu",
            max_num_seqs=4,
        )
        try:
            yield f"http://127.0.0.1:{rest_port}/v1", smollm2
        finally:
            client.terminate_server()


def test_openai_sdk_parse_returns_the_pydantic_object(base_url):
    url, model = base_url
    with openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=120) as client:
        completion = client.chat.completions.parse(
            model=model,
            messages=[{"role": "user", "content": QUESTION}],
            response_format=Person,
            max_tokens=MAX_TOKENS,
            temperature=0,
        )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Person)
    assert Person.model_validate_json(choice.message.content) == choice.message.parsed


def test_langchain_with_structured_output(base_url):
    from langchain_openai import ChatOpenAI

    url, model = base_url
    llm = ChatOpenAI(
        base_url=url, api_key="none", model=model, temperature=0, max_tokens=MAX_TOKENS
    )
    person = llm.with_structured_output(Person).invoke(QUESTION)  # method: json_schema
    assert isinstance(person, Person)
    # json_mode: any JSON object, parsed by LangChain into a dict.
    answer = llm.with_structured_output(None, method="json_mode").invoke(
        QUESTION + " Answer in JSON."
    )
    assert isinstance(answer, dict)
    json.dumps(answer)
