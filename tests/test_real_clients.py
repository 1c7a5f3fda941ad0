"""Real clients that nobody on this project wrote, against a real ``mii serve`` on
loopback (issue 16, item 8): lm-evaluation-harness's ``local-completions`` (its
default tokenized mode: token-id prompts, ``echo`` + ``logprobs`` for loglikelihoods),
LangChain's ``ChatOpenAI`` and ``OpenAI``, litellm's pass-through of vLLM's
options, and the ``openai`` SDK where the other
serving tests leave gaps (token-id prompts with echo, options while streaming,
``/tokenizer_info``).

One ``mii serve`` subprocess per module serves the real SmolLM2-135M-Instruct, so
that a multiple-choice task has right answers; what the clients get is compared
with what the deployment's own Python client (gRPC) gives for the same token ids.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass

import httpx
import openai
import pytest

import mii
from mii.rpc import registry
from mii.rpc.deployment import free_port

lm_eval = pytest.importorskip("lm_eval", reason="pip install -e '.[clients]'")
langchain_openai = pytest.importorskip("langchain_openai", reason="pip install -e '.[clients]'")

STARTUP_S = 240  # loading (and, on a fresh cache, converting) the GGUF file
CAPITALS = [  # (country, index of its capital in CITIES): a real model gets these right
    ("France", 0),
    ("Germany", 1),
    ("Spain", 2),
    ("Italy", 3),
]
CITIES = ["Paris", "Berlin", "Madrid", "Rome"]
GENERATE = [  # (prompt, the answer SmolLM2 gives, ended by a stop string)
    ("Count: one, two, three,", " four"),
    ("The capital of France is", " Paris"),
]
UNTIL = [",", "."]
MAX_GEN_TOKS = 8


@dataclass
class Server:
    name: str  # the deployment name (also the model name the clients send)
    url: str  # the HTTP API's base URL, http://127.0.0.1:PORT
    client: mii.rpc.client.MiiClient  # the deployment's own gRPC client: the reference

    def tokenize(self, text: str) -> list[int]:
        """The ids lm-eval makes of ``text`` (no special tokens)."""
        body = {"prompt": text, "add_special_tokens": False}
        return httpx.post(f"{self.url}/tokenize", json=body, timeout=60).json()["tokens"]


def start_mii_serve(model: str, name: str) -> tuple[subprocess.Popen, str]:
    """``mii serve MODEL`` in a subprocess, as a user starts it; returns the process
    and the HTTP API's base URL once the deployment is ready. The one place that
    knows ``mii serve``'s port flags."""
    http_port = free_port()
    ports = ["--port", str(http_port), "--grpc-port", str(free_port())]
    process = subprocess.Popen(
        [sys.executable, "-m", "mii", "serve", model, "--deployment-name", name, *ports],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    deadline = time.monotonic() + STARTUP_S
    while registry.lookup(name) is None:  # recorded once it serves
        if process.poll() is not None:
            pytest.fail(f"mii serve exited with {process.returncode}: {process.stderr.read()}")
        assert time.monotonic() < deadline, f"mii serve did not start in {STARTUP_S} s"
        time.sleep(0.2)
    return process, f"http://127.0.0.1:{http_port}"


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
    try:
        process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()


@pytest.fixture(scope="module")
def server(smollm2):
    name = f"clients-{uuid.uuid4().hex[:8]}"
    process, url = start_mii_serve(smollm2, name)
    client = mii.client(name)
    try:
        yield Server(name, url, client)
    finally:
        client.close()
        stop(process)


def greedy(server: Server, ids: list[int], **options) -> mii.Response:
    return server.client.generate(ids, do_sample=False, **options)[0]


def loglikelihood(server: Server, context: str, continuation: str) -> tuple[float, bool]:
    """What lm-eval should report for ``continuation`` after ``context``, from the
    deployment's Python client: the sum of the continuation's prompt logprobs, and
    whether greedy decoding would produce exactly it."""
    ctx = server.tokenize(context)
    whole = server.tokenize(context + continuation)
    assert whole[: len(ctx)] == ctx  # the continuation starts a new token
    scored = greedy(server, whole, max_new_tokens=0, prompt_logprobs=0)
    total = sum(e.logprob for e in scored.prompt_logprobs[len(ctx) :])
    cont = whole[len(ctx) :]
    is_greedy = greedy(server, ctx, max_new_tokens=len(cont), ignore_eos=True).token_ids == cont
    return total, is_greedy


# ----- lm-evaluation-harness ---------------------------------------------------------


# lm-eval task files as a user writes them; DATA and CACHE are filled in.
CAPITALS_YAML = """task: mii_capitals
dataset_path: json
dataset_kwargs:
  data_files: DATA
  cache_dir: CACHE
test_split: train
output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{answer}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
ANSWERS_YAML = """task: mii_answers
dataset_path: json
dataset_kwargs:
  data_files: DATA
  cache_dir: CACHE
test_split: train
output_type: generate_until
doc_to_text: "{{question}}"
doc_to_target: "{{answer}}"
generation_kwargs:
  until: UNTIL
  max_gen_toks: MAX_GEN_TOKS
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """Two lm-eval tasks from local YAML and JSONL files: a loglikelihood multiple
    choice (capitals) and a generate_until (answers ended by a stop string)."""
    from lm_eval.tasks import TaskManager

    folder = tmp_path_factory.mktemp("lm-eval-tasks")
    cache = str(folder / "datasets-cache")  # not the user's ~/.cache
    capitals = [
        {"question": f"The capital of {c} is", "choices": CITIES, "answer": a} for c, a in CAPITALS
    ]
    answers = [{"question": q, "answer": a} for q, a in GENERATE]
    for name, rows, yaml in [
        ("mii_capitals", capitals, CAPITALS_YAML),
        ("mii_answers", answers, ANSWERS_YAML),
    ]:
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(row) + "\n" for row in rows))
        yaml = yaml.replace("DATA", str(data)).replace("CACHE", cache)
        yaml = yaml.replace("MAX_GEN_TOKS", str(MAX_GEN_TOKS)).replace("UNTIL", json.dumps(UNTIL))
        (folder / f"{name}.yaml").write_text(yaml)
    return TaskManager(include_path=str(folder))


def evaluate(lm, tasks, names: list[str]) -> dict:
    return lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=tasks, log_samples=True)


def local_completions(server: Server, **args):
    from lm_eval.api.registry import get_model

    return get_model("local-completions")(
        model=server.name, base_url=f"{server.url}/v1/completions", **args
    )


def test_lm_eval_tasks_with_a_local_tokenizer(server, tasks, smollm2):
    """``local-completions`` with ``tokenizer=`` the checkpoint's folder: token-id
    prompts; each choice's loglikelihood is exactly the sum of the prompt logprobs
    mii's Python client gives, the real model picks every right capital, and the
    generations are mii's greedy answers cut at the task's stop strings."""
    from mii.models.loader import resolve_model_dir

    checkpoint = resolve_model_dir(smollm2, None, weights=False)  # the converted GGUF
    lm = local_completions(server, tokenizer=str(checkpoint), tokenizer_backend="huggingface")
    assert lm.tokenized_requests  # lm-eval's default: prompts sent as token ids
    out = evaluate(lm, tasks, ["mii_capitals", "mii_answers"])
    assert out["results"]["mii_capitals"]["acc,none"] == 1.0
    assert out["results"]["mii_answers"]["exact_match,none"] == 1.0
    for sample in out["samples"]["mii_capitals"]:
        for (context, continuation), [(ll, is_greedy)] in zip(sample["arguments"], sample["resps"]):
            assert continuation.startswith(" ")  # lm-eval's target delimiter
            assert (ll, is_greedy) == loglikelihood(server, context, continuation)
        assert any(g for [(_, g)] in sample["resps"])  # the right capital is greedy
    for sample in out["samples"]["mii_answers"]:
        [(context, options)] = sample["arguments"]
        assert options == {"until": UNTIL, "max_gen_toks": MAX_GEN_TOKS}
        expected = greedy(
            server, server.tokenize(context), max_new_tokens=MAX_GEN_TOKS, stop=UNTIL
        ).generated_text
        assert sample["resps"] == [[expected]]


def test_lm_eval_tokenizes_through_the_server(server, tasks):
    """Without a local tokenizer (a GGUF file, no hub): lm-eval finds
    ``/tokenizer_info`` and ``/tokenize`` and uses them; batched requests (several
    token-id prompts in one body) score the same; vLLM's sampling options given as
    lm-eval's ``--gen_kwargs`` reach the engine."""
    lm = local_completions(server, batch_size=4)
    assert lm.tokenizer_backend == "remote" and lm.tokenized_requests
    extra = {"repetition_penalty": 1.5, "min_p": 0.05}
    gen_kwargs = ",".join(f"{k}={v}" for k, v in extra.items())  # as on lm_eval's command line
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=["mii_capitals", "mii_answers"],
        task_manager=tasks,
        log_samples=True,
        gen_kwargs=gen_kwargs,
    )
    assert out["results"]["mii_capitals"]["acc,none"] == 1.0
    for sample in out["samples"]["mii_capitals"]:
        for (context, continuation), [(ll, is_greedy)] in zip(sample["arguments"], sample["resps"]):
            expected, expected_greedy = loglikelihood(server, context, continuation)
            # Scored in a batch of 4 prompts: the same math in other matmul shapes.
            assert math.isclose(ll, expected, abs_tol=1e-4) and is_greedy == expected_greedy
    changed = False
    for sample in out["samples"]["mii_answers"]:
        [(context, options)] = sample["arguments"]
        assert options == {"until": UNTIL, "max_gen_toks": MAX_GEN_TOKS, **extra}
        ids = server.tokenize(context)
        options = dict(max_new_tokens=MAX_GEN_TOKS, stop=UNTIL)
        expected = greedy(server, ids, **options, **extra).generated_text
        assert sample["resps"] == [[expected]]
        changed |= expected != greedy(server, ids, **options).generated_text
    assert changed  # the options made a difference


def test_tokenizer_info(server):
    """vLLM's ``GET /tokenizer_info``: the tokenizer's special tokens and template."""
    info = httpx.get(f"{server.url}/tokenizer_info", timeout=60).json()
    assert info["eos_token"] == "<|im_end|>" and info["tokenizer_class"]
    assert info["chat_template"].startswith("{% for message in messages %}")
    assert info["model_max_length"] == 8192
    assert server.tokenize(info["eos_token"]) == [2]  # SmolLM2's <|im_end|>


# ----- LangChain ---------------------------------------------------------------------


def test_langchain_chat_and_completions(server):
    """``ChatOpenAI`` and ``OpenAI`` pointed at the deployment: invoke, stream and
    logprobs."""
    from langchain_openai import ChatOpenAI, OpenAI

    common = dict(
        model=server.name, base_url=f"{server.url}/v1", api_key="none", max_retries=0, temperature=0
    )
    question = "What is the capital of France?"
    chat = ChatOpenAI(max_tokens=12, **common)
    answer = chat.invoke(question)
    assert "Paris" in answer.content
    assert answer.response_metadata["finish_reason"] == "stop"
    chunks = list(chat.stream(question))
    assert "".join(c.content for c in chunks) == answer.content
    assert answer.usage_metadata["output_tokens"] > 0

    scored = ChatOpenAI(max_tokens=12, logprobs=True, top_logprobs=2, **common).invoke(question)
    content = scored.response_metadata["logprobs"]["content"]
    assert scored.content == answer.content
    # As vLLM: the EOS token that ended the answer is scored too, its text not in the content.
    assert "".join(e["token"] for e in content) == scored.content + "<|im_end|>"
    assert len(content) == scored.usage_metadata["output_tokens"]
    for entry in content:  # greedy: the chosen token is the most likely one
        assert len(entry["top_logprobs"]) == 2
        assert entry["top_logprobs"][0]["token"] == entry["token"]
        assert entry["top_logprobs"][0]["logprob"] == entry["logprob"] <= 0

    prompt = "The capital of France is"
    llm = OpenAI(max_tokens=MAX_GEN_TOKS, **common)
    text = llm.invoke(prompt)
    expected = greedy(server, server.tokenize(prompt), max_new_tokens=MAX_GEN_TOKS)
    assert text == expected.generated_text
    assert "".join(llm.stream(prompt)) == text
    generation = OpenAI(max_tokens=4, logprobs=2, **common).generate([prompt]).generations[0][0]
    logprobs = generation.generation_info["logprobs"]
    assert "".join(logprobs["tokens"]) == generation.text == text[: len(generation.text)]
    assert len(logprobs["token_logprobs"]) == 4


def test_litellm_passes_vllm_options_through(server, monkeypatch):
    """litellm's ``openai/`` provider: vLLM's sampling options and chat template
    options given as keyword arguments reach the engine (the answer is the chat
    route's with the same options); OpenAI's storage fields are accepted."""
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no download at import
    litellm = pytest.importorskip("litellm", reason="pip install -e '.[clients]'")

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    extra = {"min_p": 0.1, "repetition_penalty": 1.3}
    common = dict(
        model=f"openai/{server.name}",
        api_base=f"{server.url}/v1",
        api_key="none",
        messages=messages,
        temperature=0,
        max_tokens=MAX_GEN_TOKS,
    )
    answer = litellm.completion(
        **common,
        **extra,
        chat_template_kwargs={"enable_thinking": False},
        store=False,
        metadata={"run": "ci"},
    )
    text = answer.choices[0].message.content
    oai = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
    chat = dict(model=server.name, messages=messages, temperature=0, max_tokens=MAX_GEN_TOKS)
    expected = oai.chat.completions.create(**chat, extra_body=extra).choices[0].message.content
    plain = oai.chat.completions.create(**chat).choices[0].message.content
    oai.close()
    assert text == expected != plain
    pieces = litellm.completion(**common, **extra, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in pieces) == text


# ----- the openai SDK: what the other serving tests leave out --------------------------


def test_openai_echo_of_token_id_prompts(server):
    """lm-eval's request as the SDK sends it: several token-id prompts with echo and
    logprobs; and OpenAI's scoring idiom, ``max_tokens: 0``, names the same tokens
    at the same offsets."""
    oai = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
    prompts = [server.tokenize(q) for q, _ in GENERATE]
    scored = {}
    for max_tokens in (1, 0):
        result = oai.completions.create(
            model=server.name,
            prompt=prompts,
            echo=True,
            logprobs=1,
            max_tokens=max_tokens,
            temperature=0,
        )
        scored[max_tokens] = [c.logprobs for c in sorted(result.choices, key=lambda c: c.index)]
        for ids, choice, lp in zip(prompts, result.choices, scored[max_tokens]):
            assert len(lp.tokens) == len(ids) + max_tokens
            assert "".join(lp.tokens) == choice.text  # echo: the prompt's text, then the answer
            offsets = [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
            assert lp.text_offset == offsets
            reference = greedy(server, ids, max_new_tokens=0, prompt_logprobs=1)
            assert lp.token_logprobs[0] is None
            # Two prompts in one pass: the same math in other matmul shapes.
            expected = [e.logprob for e in reference.prompt_logprobs[1:]]
            assert lp.token_logprobs[1 : len(ids)] == pytest.approx(expected, abs=1e-4)
    for with_answer, alone in zip(scored[1], scored[0]):
        assert alone.tokens == with_answer.tokens[:-1]
        assert alone.text_offset == with_answer.text_offset[:-1]
    oai.close()


def test_openai_options_while_streaming(server):
    """vLLM's sampling extensions (``extra_body``) and ``logit_bias`` apply to
    streamed answers as to whole ones, on both routes."""
    oai = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
    comma = server.tokenize(",")[0]
    options = dict(
        model=server.name,
        max_tokens=MAX_GEN_TOKS,
        temperature=0,
        logit_bias={str(comma): -100},
        extra_body={"repetition_penalty": 1.3, "min_p": 0.05, "min_tokens": 2},
    )
    prompt = "Count: one, two, three,"
    whole = oai.completions.create(prompt=prompt, **options).choices[0].text
    plain = oai.completions.create(prompt=prompt, model=server.name, max_tokens=8, temperature=0)
    assert whole != plain.choices[0].text and "," not in whole  # the options took effect
    streamed = oai.completions.create(prompt=prompt, stream=True, **options)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == whole

    messages = [{"role": "user", "content": "List three colors."}]
    whole = oai.chat.completions.create(messages=messages, **options).choices[0].message.content
    assert "," not in whole
    streamed = oai.chat.completions.create(messages=messages, stream=True, **options)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == whole
    oai.close()


def test_tokenizer_info_without_a_chat_template(tokenizer):
    """A tokenizer without a template answers ``chat_template: null`` (the chat
    route's fallback is no template a client could render)."""
    from mii.rpc.http.tokenize_routes import tokenizer_info

    info = tokenizer_info(tokenizer, 64)
    assert info["chat_template"] is None and info["model_max_length"] == 64
    assert info["eos_token"] == tokenizer.eos_token
    assert set(info) == {
        "tokenizer_class",
        *("bos_token", "eos_token", "pad_token", "unk_token"),
        *("chat_template", "model_max_length"),
    }
