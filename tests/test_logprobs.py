"""Logprobs of generated tokens and of prompt tokens, against transformers' own
log-softmax of the same checkpoint (fp32): in the engine (alone, in batches
split into small chunks with preemption, with async scheduling), in the
``processed`` mode against transformers' logits warpers, and through every
surface (gRPC client, mii's REST route, both OpenAI routes, streamed or not)."""

from __future__ import annotations

import math
import uuid

import httpx
import openai
import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import mii
from mii.engine import logprobs as logprobs_module
from mii.errors import InvalidRequestError
from mii.rpc.deployment import free_port

PROMPTS = [
    "the quick brown fox jumps over the lazy dog",
    "hello there",
    "DeepSpeed is a library for fast training and inference of large models",
]
NEW = 6
TOLERANCE = 1e-4
# A batch split into 5-token passes in a pool that cannot hold every sequence: prompt
# chunks, preemption and recomputation all happen.
TIGHT = dict(token_budget=5, max_num_seqs=4, kv_block_size=4, num_kv_blocks=10)


def hf_logprobs(hf_model, ids: list[int]) -> torch.Tensor:
    """transformers' log-softmax at every position of ``ids`` (fp32): [len, V]."""
    with torch.no_grad():
        logits = hf_model(torch.tensor([ids])).logits[0].float()
    return logits.log_softmax(dim=-1)


def same_logprobs(a, b) -> bool:
    """Two runs' logprobs of the same tokens: equal ids, values within 1e-5 (a
    prefix read from the prefix cache was computed in other passes: float order differs)."""
    if a is None or b is None:
        return a is b
    return len(a) == len(b) and all(
        (x is None and y is None)
        or (
            x.token_id == y.token_id
            and abs(x.logprob - y.logprob) < 1e-5
            and [t for t, _ in x.top] == [t for t, _ in y.top]
            and all(abs(u - v) < 1e-5 for (_, u), (_, v) in zip(x.top, y.top))
        )
        for x, y in zip(a, b)
    )


def close(a: list, b: list) -> bool:
    """Lists of logprobs (None for the first prompt token) within 1e-5."""
    return len(a) == len(b) and all(
        (x is None and y is None) or abs(x - y) < 1e-5 for x, y in zip(a, b)
    )


def rank_within(rank: int, row: torch.Tensor, token_id: int) -> bool:
    """``rank`` is 1 + the tokens of ``row`` more likely than ``token_id``, up to
    ties within the tolerance (mii's and transformers' logits differ by ~1e-6)."""
    own = row[token_id].item()
    return 1 + int((row > own + TOLERANCE).sum()) <= rank <= 1 + int((row > own - TOLERANCE).sum())


def assert_matches(entry, token_id: int, row: torch.Tensor, k: int) -> None:
    """One TokenLogprob equals transformers' row for ``token_id`` (its logprob and
    rank) and its top k."""
    assert entry.token_id == token_id
    assert abs(entry.logprob - row[token_id].item()) < TOLERANCE
    assert rank_within(entry.rank, row, token_id)
    top = row.topk(k)
    assert [t for t, _ in entry.top] == top.indices.tolist()
    assert all(abs(lp - v) < TOLERANCE for (_, lp), v in zip(entry.top, top.values.tolist()))


def check_response(hf_model, tokenizer, prompt: str, response, k: int, prompt_k: int | None):
    prompt_ids = tokenizer(prompt).input_ids
    ids = prompt_ids + response.token_ids
    expected = hf_logprobs(hf_model, ids)
    n = len(prompt_ids)
    assert len(response.logprobs) == len(response.token_ids)
    for i, entry in enumerate(response.logprobs):
        assert_matches(entry, ids[n + i], expected[n + i - 1], k)
    if prompt_k is None:
        assert response.prompt_logprobs is None
        return
    assert response.prompt_token_ids == prompt_ids
    assert len(response.prompt_logprobs) == n and response.prompt_logprobs[0] is None
    for j in range(1, n):
        assert_matches(response.prompt_logprobs[j], ids[j], expected[j - 1], prompt_k)


@pytest.fixture(scope="module")
def tiny(checkpoints):
    path, hf_model = checkpoints("llama")
    return str(path), hf_model


def test_greedy_and_prompt_logprobs_equal_transformers(tiny, tokenizer, tmp_path, monkeypatch):
    path, hf_model = tiny
    monkeypatch.setenv("MII_CACHE_DIR", str(tmp_path))
    # Prompt rows become logits 3 at a time: slicing must not change a value.
    monkeypatch.setattr(logprobs_module, "PROMPT_SLICE_ROWS", 3)
    with mii.pipeline(path, device="cpu") as pipe:
        alone = [
            pipe(p, do_sample=False, max_new_tokens=NEW, logprobs=3, prompt_logprobs=2)[0]
            for p in PROMPTS
        ]
    for prompt, response in zip(PROMPTS, alone):
        check_response(hf_model, tokenizer, prompt, response, 3, 2)

    # In one batch, chunked and preempted, with a request that asks for nothing
    # and one that asks only for generated-token logprobs.
    with mii.pipeline(path, device="cpu", **TIGHT) as pipe:
        batch = pipe(PROMPTS, do_sample=False, max_new_tokens=NEW, logprobs=3, prompt_logprobs=2)
        plain = pipe(PROMPTS[0], do_sample=False, max_new_tokens=NEW)[0]
        only_generated = pipe(PROMPTS[2], do_sample=False, max_new_tokens=NEW, logprobs=0)[0]
        assert pipe.engine.stats()["preemptions"] > 0
    for prompt, response in zip(PROMPTS, batch):
        check_response(hf_model, tokenizer, prompt, response, 3, 2)
    assert plain.logprobs is None and plain.prompt_logprobs is None
    check_response(hf_model, tokenizer, PROMPTS[2], only_generated, 0, None)


def test_async_scheduling_and_sampled_requests(tiny, tokenizer, tmp_path, monkeypatch):
    """Async scheduling reads logprobs back with the tokens; sampled tokens' logprobs
    are still of the raw distribution (logprobs_mode="raw", the default)."""
    path, hf_model = tiny
    monkeypatch.setenv("MII_CACHE_DIR", str(tmp_path))
    with mii.pipeline(path, device="cpu", async_scheduling=True, **TIGHT) as pipe:
        responses = pipe(
            PROMPTS,
            max_new_tokens=NEW,
            temperature=1.5,
            top_k=5,
            seed=3,
            ignore_eos=True,
            logprobs=2,
            prompt_logprobs=1,
        )
    for prompt, response in zip(PROMPTS, responses):
        check_response(hf_model, tokenizer, prompt, response, 2, 1)


def test_processed_logprobs_equal_transformers_warpers(tiny, tokenizer, tmp_path, monkeypatch):
    path, hf_model = tiny
    monkeypatch.setenv("MII_CACHE_DIR", str(tmp_path))
    options = dict(temperature=0.7, top_k=8, top_p=0.8, repetition_penalty=1.3)
    with mii.pipeline(path, device="cpu") as pipe:
        response = pipe(
            PROMPTS[0],
            max_new_tokens=NEW,
            seed=11,
            ignore_eos=True,
            logprobs=4,
            logprobs_mode="processed",
            **options,
        )[0]
        greedy = pipe(
            PROMPTS[0], do_sample=False, max_new_tokens=3, logprobs=2, logprobs_mode="processed"
        )[0]
    prompt_ids = tokenizer(PROMPTS[0]).input_ids
    ids = prompt_ids + response.token_ids
    with torch.no_grad():
        logits = hf_model(torch.tensor([ids])).logits[0].float()
    warpers = [
        RepetitionPenaltyLogitsProcessor(options["repetition_penalty"]),
        TemperatureLogitsWarper(options["temperature"]),
        TopKLogitsWarper(options["top_k"]),
        TopPLogitsWarper(options["top_p"]),
    ]
    n = len(prompt_ids)
    for i, entry in enumerate(response.logprobs):
        scores = logits[n + i - 1][None]
        for warp in warpers:
            scores = warp(torch.tensor([ids[: n + i]]), scores)
        row = scores[0].log_softmax(dim=-1)
        kept = int(torch.isfinite(row).sum())
        assert math.isfinite(entry.logprob)  # the sampled token was kept
        assert abs(entry.logprob - row[ids[n + i]].item()) < TOLERANCE
        shown = min(4, kept)  # beyond the kept tokens, both are -inf
        assert [t for t, _ in entry.top[:shown]] == row.topk(shown).indices.tolist()
        assert all(lp == -math.inf for _, lp in entry.top[shown:])
    # Plain greedy rows' processed distribution is the raw one (nothing warps it).
    check_response(hf_model, tokenizer, PROMPTS[0], greedy, 2, None)


async def test_stream_pieces_carry_their_tokens_logprobs(tiny, tmp_path, monkeypatch):
    path, _ = tiny
    monkeypatch.setenv("MII_CACHE_DIR", str(tmp_path))
    engine = mii.AsyncEngine(path, device="cpu")
    try:
        whole = (
            await engine.generate(
                PROMPTS[0], do_sample=False, max_new_tokens=NEW, logprobs=1, prompt_logprobs=1
            )
        )[0]
        pieces = [
            piece
            async for piece in engine.stream(
                PROMPTS[0], do_sample=False, max_new_tokens=NEW, logprobs=1, prompt_logprobs=1
            )
        ]
    finally:
        await engine.aclose()
    assert all(len(p.logprobs) == len(p.token_ids) for p in pieces)
    assert same_logprobs(pieces[0].prompt_logprobs, whole.prompt_logprobs)
    assert all(p.prompt_logprobs is None for p in pieces[1:])
    assert same_logprobs([e for p in pieces for e in p.logprobs], whole.logprobs)


def test_prompt_logprobs_without_new_tokens(tiny, tokenizer, tmp_path, monkeypatch):
    """max_new_tokens=0 with prompt_logprobs scores the prompt and generates nothing
    (OpenAI's echo with max_tokens 0)."""
    path, hf_model = tiny
    monkeypatch.setenv("MII_CACHE_DIR", str(tmp_path))
    with mii.pipeline(path, device="cpu") as pipe:
        response = pipe(PROMPTS[2], max_new_tokens=0, prompt_logprobs=0)[0]
    assert (response.generated_text, response.generated_length) == ("", 0)
    assert response.token_ids == [] and response.finish_reason == "length"
    ids = tokenizer(PROMPTS[2]).input_ids
    assert response.prompt_token_ids == ids  # what echo names the scored tokens by
    expected = hf_logprobs(hf_model, ids)
    assert response.prompt_logprobs[0] is None
    for j in range(1, len(ids)):
        assert abs(response.prompt_logprobs[j].logprob - expected[j - 1, ids[j]].item()) < TOLERANCE


def test_a_prompt_that_fills_max_length_can_be_scored(tiny, tokenizer, tmp_path, monkeypatch):
    """Scoring asks for no new token, so its prompt may fill max_length (it was refused
    as leaving no room: lm-evaluation-harness scores full-context windows); a request
    for new tokens still needs room for one."""
    path, hf_model = tiny
    monkeypatch.setenv("MII_CACHE_DIR", str(tmp_path))
    ids = (tokenizer(" ".join(PROMPTS)).input_ids * 8)[:40]
    with mii.pipeline(path, device="cpu", max_length=40, kv_block_size=8) as pipe:
        response = pipe([ids], max_new_tokens=0, prompt_logprobs=0)[0]
        with pytest.raises(InvalidRequestError, match="leaves no room") as err:
            pipe([ids], max_new_tokens=1, prompt_logprobs=0)
        assert err.value.field == "prompt"
        # no new token asked for: not "no room" but over (user trial)
        with pytest.raises(InvalidRequestError, match="41 tokens, more than max_length=40"):
            pipe([[*ids, 5]], max_new_tokens=0, prompt_logprobs=0)
        # a truncation that can never fit is refused, as vLLM refuses it (it was taken)
        with pytest.raises(InvalidRequestError, match="41 is more than max_length=40") as err:
            pipe([ids[:5]], max_new_tokens=1, truncate_prompt_tokens=41)
        assert err.value.field == "truncate_prompt_tokens"
        assert pipe([ids[:5]], max_new_tokens=1, truncate_prompt_tokens=40)[0].prompt_length == 5
        # truncate_prompt_tokens=-1 keeps as many as the request has room for: all 40
        # when scoring, 39 when a token is asked for.
        longer = [[7, *ids]]
        kept = pipe(longer, max_new_tokens=0, prompt_logprobs=0, truncate_prompt_tokens=-1)[0]
        assert kept.prompt_token_ids == ids
        one = pipe(longer, max_new_tokens=1, truncate_prompt_tokens=-1)[0]
        assert one.prompt_length == 39
    assert (response.generated_length, response.finish_reason) == (0, "length")
    expected = hf_logprobs(hf_model, ids)
    for j in range(1, len(ids)):
        assert abs(response.prompt_logprobs[j].logprob - expected[j - 1, ids[j]].item()) < TOLERANCE


@pytest.mark.parametrize(
    "options, field",
    [
        ({"logprobs": 21}, "logprobs"),
        ({"logprobs": -1}, "logprobs"),
        ({"prompt_logprobs": True}, "prompt_logprobs"),
        ({"logprobs_mode": "scaled"}, "logprobs_mode"),
    ],
)
def test_invalid_logprobs_options_name_the_field(options, field):
    with pytest.raises(InvalidRequestError) as err:
        mii.GenerateParams.parse(**options)
    assert err.value.field == field


# ----- every surface -------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tiny, tmp_path_factory):
    path, hf_model = tiny
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MII_CACHE_DIR", str(tmp_path_factory.mktemp("mii-cache")))
        name = f"logprobs-{uuid.uuid4().hex[:8]}"
        rest_port = free_port()
        client = mii.serve(
            path,
            deployment_name=name,
            enable_restful_api=True,
            restful_api_port=rest_port,
            port=free_port(),
        )
        url = f"http://127.0.0.1:{rest_port}"
        try:
            yield client, name, url, hf_model
        finally:
            client.terminate_server()


def test_grpc_client_returns_logprobs(served, tokenizer):
    client, _, _, hf_model = served
    response = client.generate(
        PROMPTS[0], do_sample=False, max_new_tokens=NEW, logprobs=2, prompt_logprobs=2
    )[0]
    check_response(hf_model, tokenizer, PROMPTS[0], response, 2, 2)
    pieces = list(client.stream(PROMPTS[0], do_sample=False, max_new_tokens=NEW, logprobs=2))
    assert same_logprobs([e for p in pieces for e in p.logprobs], response.logprobs)
    assert client.generate(PROMPTS[0], max_new_tokens=2)[0].logprobs is None


def test_rest_route_returns_logprobs(served, tokenizer):
    _, name, url, hf_model = served
    body = {
        "prompts": [PROMPTS[1]],
        "do_sample": False,
        "max_new_tokens": NEW,
        "logprobs": 1,
        "prompt_logprobs": 0,
    }
    answer = httpx.post(f"{url}/mii/{name}", json=body, timeout=60).json()[0]
    ids = tokenizer(PROMPTS[1]).input_ids + answer["token_ids"]
    expected = hf_logprobs(hf_model, ids)
    n = answer["prompt_length"]
    assert answer["prompt_token_ids"] == ids[:n] and answer["prompt_logprobs"][0] is None
    for j, entry in enumerate(answer["prompt_logprobs"][1:], start=1):
        assert abs(entry["logprob"] - expected[j - 1, ids[j]].item()) < TOLERANCE
    for i, entry in enumerate(answer["logprobs"]):
        assert entry["token_id"] == ids[n + i]
        assert abs(entry["logprob"] - expected[n + i - 1, ids[n + i]].item()) < TOLERANCE
        assert len(entry["top_logprobs"]) == 1


def openai_client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)


def test_openai_completions_logprobs_and_echo(served, tokenizer):
    client, _, url, hf_model = served
    oai = openai_client(url)
    prompt = PROMPTS[0]
    prompt_ids = tokenizer(prompt).input_ids
    greedy = dict(prompt=prompt, temperature=0, model=None)
    result = oai.completions.create(max_tokens=4, logprobs=2, echo=True, **greedy)
    lp = result.choices[0].logprobs
    n = len(prompt_ids)
    assert len(lp.tokens) == n + 4 == len(lp.token_logprobs) == len(lp.top_logprobs)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    generated = client.generate(prompt, do_sample=False, max_new_tokens=4)[0].token_ids
    ids = prompt_ids + generated
    assert lp.tokens == tokenizer.batch_decode([[i] for i in ids])
    expected = hf_logprobs(hf_model, ids)
    for j in range(1, len(ids)):
        assert abs(lp.token_logprobs[j] - expected[j - 1, ids[j]].item()) < TOLERANCE
        assert lp.tokens[j] in lp.top_logprobs[j]  # the chosen token is always listed
        assert 2 <= len(lp.top_logprobs[j]) <= 3
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)

    # lm-evaluation-harness's loglikelihood request: echo, max_tokens 1, logprobs 1.
    # And OpenAI's scoring idiom: echo with max_tokens 0 scores the prompt alone.
    for max_tokens in (1, 0):
        scored = oai.completions.create(max_tokens=max_tokens, logprobs=1, echo=True, **greedy)
        scored = scored.choices[0].logprobs
        assert len(scored.token_logprobs) == n + max_tokens
        assert close(scored.token_logprobs[1:n], lp.token_logprobs[1:n])

    # Streamed: each token's logprob arrives once, in order.
    streamed = []
    for chunk in oai.completions.create(max_tokens=4, logprobs=2, stream=True, **greedy):
        if chunk.choices and chunk.choices[0].logprobs:
            streamed.extend(chunk.choices[0].logprobs.token_logprobs)
    assert close(streamed, lp.token_logprobs[n:])


def test_every_choice_of_an_echo_carries_the_prompt_s_logprobs(served, tokenizer):
    """n choices with echo + logprobs (and vLLM's prompt_logprobs): each choice shows
    the prompt's scores, the same as one choice's (they are computed once: each
    choice scored the prompt again, n=8 took 9.0 s against 1.4 s)."""
    _, _, url, _ = served
    oai = openai_client(url)
    base = dict(model=None, prompt=PROMPTS[2], max_tokens=2, logprobs=1, echo=True)
    one = oai.completions.create(**base, temperature=0).choices[0].logprobs
    n = len(tokenizer(PROMPTS[2]).input_ids)
    several = oai.completions.create(**base, n=3, seed=5).choices
    assert [c.index for c in several] == [0, 1, 2]
    for choice in several:
        assert choice.logprobs.tokens[:n] == one.tokens[:n]
        assert close(choice.logprobs.token_logprobs[1:n], one.token_logprobs[1:n])
        assert len(choice.logprobs.tokens) == n + 2
    body = {"prompt": PROMPTS[1], "max_tokens": 1, "n": 2, "prompt_logprobs": 1}
    answer = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()["choices"]
    assert answer[0]["prompt_logprobs"] == answer[1]["prompt_logprobs"]
    assert answer[0]["prompt_logprobs"][0] is None and len(answer[0]["prompt_logprobs"]) > 1


def test_the_prompt_of_several_choices_is_scored_once(llama):
    """Only choice 0 asks the engine for the prompt's logprobs; the others' answers
    carry a copy (per prompt: two prompts, two different scores)."""
    from mii.response import Response, TokenLogprob
    from scripted_gateway import ScriptedPool, with_gateway

    class ScoringPool(ScriptedPool):
        async def generate(self, prompts, params, timeout=None):
            answers = await super().generate(prompts, params, timeout)
            if params.get("prompt_logprobs") is None:
                return answers
            return [  # a prompt of length L: its second token scored -L
                Response(
                    a.generated_text,
                    a.prompt_length,
                    a.generated_length,
                    a.finish_reason,
                    prompt_token_ids=[0, len(p)],
                    prompt_logprobs=[None, TokenLogprob(len(p), -float(len(p)))],
                )
                for a, p in zip(answers, prompts, strict=True)
            ]

    pool = ScoringPool("!")
    choices = []

    async def scenario(_, gateway):
        body = {"prompt": ["ab", "abcd"], "n": 3, "max_tokens": 1, "prompt_logprobs": 0}
        async with httpx.AsyncClient(base_url=gateway.url, timeout=60) as http:
            reply = await http.post("/v1/completions", json=body)
        assert reply.status_code == 200, reply.text
        choices.extend(reply.json()["choices"])

    with_gateway(llama, pool, scenario)
    asked = [params for _, params in pool.sent]
    assert len(asked) == 6  # 2 prompts x 3 choices, one of them scoring both prompts
    assert sum(params.get("prompt_logprobs") is not None for params in asked) == 2
    assert len(choices) == 6
    for choice in choices:  # choice index = prompt * n + i
        length = 2 if choice["index"] < 3 else 4
        [first, second] = choice["prompt_logprobs"]
        assert first is None and second[str(length)]["logprob"] == -length, choice


def test_text_offsets_point_into_the_text_a_token_id_prompt_echoes(served, tokenizer):
    """A token-id prompt with a special token (BOS): its echoed text leaves the special
    token out, and text_offset counted it (every later offset was off by its length;
    streamed, offsets went backwards). With skip_special_tokens false it is kept."""
    _, _, url, _ = served
    oai = openai_client(url)
    ids = tokenizer(PROMPTS[0]).input_ids
    assert ids[0] in tokenizer.all_special_ids
    base = dict(model=None, prompt=ids, temperature=0, max_tokens=4, logprobs=0, echo=True)

    def aligned(text: str, lp, skipped: int) -> None:
        assert lp.text_offset == sorted(lp.text_offset)
        written = [
            (token, offset)
            for token, offset in zip(lp.tokens, lp.text_offset)
            if text.startswith(token, offset)
        ]
        assert len(written) == len(lp.tokens) - skipped  # all but the skipped BOS

    whole = oai.completions.create(**base).choices[0]
    bos = whole.logprobs.tokens[0]
    assert not whole.text.startswith(bos)
    aligned(whole.text, whole.logprobs, skipped=1)
    streamed_text, offsets = "", []
    for chunk in oai.completions.create(**base, stream=True):
        if chunk.choices:
            streamed_text += chunk.choices[0].text or ""
            if chunk.choices[0].logprobs:
                offsets.extend(chunk.choices[0].logprobs.text_offset)
    assert streamed_text == whole.text and offsets == whole.logprobs.text_offset

    kept = oai.completions.create(**base, extra_body={"skip_special_tokens": False}).choices[0]
    assert kept.text.startswith(bos)  # the echo keeps the special token, as asked
    aligned(kept.text, kept.logprobs, skipped=0)


def test_streamed_text_offsets_equal_the_whole_answers_across_split_characters(served, tokenizer):
    """Characters split over byte tokens (each piece's text a U+FFFD): the whole
    answer counts each token's text; a stream's next chunk started from the
    characters sent instead, so offsets went backwards (a user trial)."""
    _, _, url, _ = served
    oai = openai_client(url)
    prompt = "Café au lait 🌊 costs €3. Naïve résumé:"
    pieces = [tokenizer.decode([i]) for i in tokenizer(prompt).input_ids]
    assert sum(len(p) for p in pieces) > len(tokenizer.decode(tokenizer(prompt).input_ids))
    base = dict(model=None, prompt=prompt, temperature=0, max_tokens=6, logprobs=1, echo=True)
    whole = oai.completions.create(**base).choices[0]
    offsets = []
    for chunk in oai.completions.create(**base, stream=True):
        if chunk.choices and chunk.choices[0].logprobs:
            offsets.extend(chunk.choices[0].logprobs.text_offset)
    assert offsets == whole.logprobs.text_offset
    assert offsets == sorted(offsets)


def test_vllm_prompt_logprobs_on_both_openai_routes(served, tokenizer):
    """vLLM's ``prompt_logprobs: k``: per prompt token (null first) a map of token id
    -> logprob, rank and decoded text for the prompt token and the k most likely,
    equal to transformers; on each completions choice, at the top of a chat answer;
    the choices' own logprobs stay the generated tokens'. Streamed: a 400 (vLLM's)."""
    _, _, url, hf_model = served
    base = {"model": None, "temperature": 0, "max_tokens": 3}

    def check(listed: list, prompt_ids: list[int], k: int) -> None:
        expected = hf_logprobs(hf_model, prompt_ids)
        assert len(listed) == len(prompt_ids) and listed[0] is None
        for j, position in enumerate(listed[1:], start=1):
            row, own = expected[j - 1], position[str(prompt_ids[j])]
            assert abs(own["logprob"] - row[prompt_ids[j]].item()) < TOLERANCE
            assert rank_within(own["rank"], row, prompt_ids[j])
            assert own["decoded_token"] == tokenizer.decode([prompt_ids[j]])
            top = row.topk(k).indices.tolist()
            assert (
                {str(t) for t in top}
                <= set(position)
                <= {str(t) for t in top} | {str(prompt_ids[j])}
            )
            for rank, t in enumerate(top, start=1):
                if t != prompt_ids[j]:
                    assert position[str(t)]["rank"] == rank

    prompt_ids = tokenizer(PROMPTS[0]).input_ids
    body = {**base, "prompt": PROMPTS[0], "prompt_logprobs": 2, "logprobs": 1, "n": 2}
    answer = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()
    for choice in answer["choices"]:
        check(choice["prompt_logprobs"], prompt_ids, 2)
        assert len(choice["logprobs"]["tokens"]) == 3  # the generated tokens' only
    assert (
        "prompt_logprobs"
        not in httpx.post(
            f"{url}/v1/completions", json={**base, "prompt": PROMPTS[0]}, timeout=60
        ).json()["choices"][0]
    )

    messages = [{"role": "user", "content": "the quick brown fox"}]
    body = {**base, "messages": messages, "prompt_logprobs": 0, "logprobs": True}
    answer = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).json()
    # the chat prompt's ids as the server templates it (the tiny tokenizer has no template)
    tokenized = {"messages": messages, "add_generation_prompt": True}
    chat_ids = httpx.post(f"{url}/tokenize", json=tokenized, timeout=60).json()["tokens"]
    check(answer["prompt_logprobs"], chat_ids, 0)
    assert len(answer["choices"][0]["logprobs"]["content"]) == answer["usage"]["completion_tokens"]

    for route, extra in (
        ("completions", {"prompt": "x"}),
        ("chat/completions", {"messages": messages}),
    ):
        body = {**base, **extra, "prompt_logprobs": 1, "stream": True}
        reply = httpx.post(f"{url}/v1/{route}", json=body, timeout=60)
        assert reply.status_code == 400 and "prompt_logprobs" in reply.text


def test_openai_chat_logprobs(served):
    _, _, url, _ = served
    oai = openai_client(url)
    chat = dict(
        messages=[{"role": "user", "content": "the quick brown fox"}],
        max_tokens=5,
        temperature=0,
        model=None,
    )
    result = oai.chat.completions.create(logprobs=True, top_logprobs=3, **chat)
    content = result.choices[0].logprobs.content
    assert len(content) == result.usage.completion_tokens
    assert all(len(entry.top_logprobs) == 3 for entry in content)
    assert all(entry.top_logprobs[0].logprob >= entry.logprob - TOLERANCE for entry in content)
    # a token's own bytes: its text's UTF-8, or for part of a character, not U+FFFD's
    whole = [e for e in content if "\ufffd" not in e.token]
    assert all(entry.bytes == list(entry.token.encode()) for entry in whole)
    assert all(e.bytes != [0xEF, 0xBF, 0xBD] for e in content if e not in whole)
    # Without top_logprobs: the chosen tokens only.
    plain = oai.chat.completions.create(logprobs=True, **chat).choices[0].logprobs.content
    assert close([e.logprob for e in plain], [e.logprob for e in content])
    assert all(e.top_logprobs == [] for e in plain)
    streamed = []
    for chunk in oai.chat.completions.create(logprobs=True, top_logprobs=3, stream=True, **chat):
        if chunk.choices and chunk.choices[0].logprobs:
            streamed.extend(chunk.choices[0].logprobs.content)
    assert close([e.logprob for e in streamed], [e.logprob for e in content])
    # top_logprobs alone, or more than 20, is a 400 naming the field.
    for bad in ({"top_logprobs": 2}, {"logprobs": True, "top_logprobs": 21}):
        with pytest.raises(openai.BadRequestError) as err:
            oai.chat.completions.create(**{**chat, **bad})
        assert "top_logprobs" in str(err.value)
    # ... but top_logprobs 0 asks for nothing (some wrappers send it with logprobs false).
    for zero in ({"top_logprobs": 0}, {"logprobs": False, "top_logprobs": 0}):
        answer = oai.chat.completions.create(**{**chat, **zero}).choices[0]
        assert answer.logprobs is None, answer


def test_streamed_responses_deltas_carry_their_tokens_logprobs(served):
    """Each response.output_text.delta carries its own tokens' logprobs, as OpenAI's
    do (they were always [], the logprobs only in the done event), and together
    they are the done event's."""
    _, _, url, _ = served
    oai = openai_client(url)
    options = dict(input="the quick brown fox", max_output_tokens=6, temperature=0)
    events = list(oai.responses.create(top_logprobs=2, stream=True, **options))
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    [done] = [e for e in events if e.type == "response.output_text.done"]
    assert deltas and all(d.logprobs for d in deltas)
    streamed = [entry for d in deltas for entry in d.logprobs]
    assert [e.token for e in streamed] == [e.token for e in done.logprobs]
    assert close([e.logprob for e in streamed], [e.logprob for e in done.logprobs])
    assert all(len(e.top_logprobs) == 2 for e in streamed)
    assert "".join(e.token for e in streamed) == done.text
    plain = list(oai.responses.create(stream=True, **options))
    assert all(e.logprobs == [] for e in plain if e.type == "response.output_text.delta")
    # With tools the answer is parsed whole before its events: a message then (here a
    # forced call cut by the length) still has its logprobs in its delta (they were []).
    tool = {"type": "function", "name": "f", "parameters": {"type": "object"}}
    forced = dict(tools=[tool], tool_choice="required", top_logprobs=1, stream=True)
    called = list(oai.responses.create(**forced, **options))
    [whole] = [e for e in called if e.type == "response.output_text.delta"]
    [ended] = [e for e in called if e.type == "response.output_text.done"]
    assert whole.logprobs and [e.token for e in whole.logprobs] == [e.token for e in ended.logprobs]
    # A stop string cuts the text of the tokens that wrote it, not their logprobs: they
    # come in a last delta (they were in the done event only).
    tokens = [e.token for e in done.logprobs]
    # A token that begins a delta (the text before it was sent) and writes the first
    # occurrence of its text: as the stop string, it cuts its own text, nothing else.
    at = None
    for sent, delta in enumerate(deltas):
        first = delta.logprobs[0].token
        whole = first.strip() and "\ufffd" not in first and delta.delta.startswith(first)
        if sent and whole and done.text.find(first) == sum(len(d.delta) for d in deltas[:sent]):
            at = sum(len(d.logprobs) for d in deltas[:sent])
            break
    assert at is not None, [(d.delta, [e.token for e in d.logprobs]) for d in deltas]
    stop = {"stop": [tokens[at]]}
    events = list(oai.responses.create(top_logprobs=2, stream=True, extra_body=stop, **options))
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    [done] = [e for e in events if e.type == "response.output_text.done"]
    [completed] = [e for e in events if e.type == "response.completed"]
    streamed = [entry for d in deltas for entry in d.logprobs]
    assert len(streamed) == completed.response.usage.output_tokens == at + 1
    assert [e.token for e in streamed] == [e.token for e in done.logprobs] == tokens[: at + 1]
    assert "".join(d.delta for d in deltas) == done.text == "".join(tokens[:at])


def test_an_aborted_requests_prompt_scores_never_reach_a_new_request_of_its_id(
    tiny, tmp_path, monkeypatch
):
    """Async scheduling: a request aborted while its prompt chunk is in flight, and
    its id reused at once; the pass's scores of the old prompt are dropped."""
    from mii.config import EngineConfig, GenerateParams
    from mii.engine.core import EngineCore

    path, _ = tiny
    monkeypatch.setenv("MII_CACHE_DIR", str(tmp_path))
    config = EngineConfig.parse(
        path, device="cpu", async_scheduling=True, token_budget=8, kv_block_size=4
    )
    core = EngineCore(config)
    params = GenerateParams.parse(do_sample=False, max_new_tokens=2, prompt_logprobs=1)
    core.add(core.make_sequence("x", PROMPTS[2], params))
    core.step()  # the first 8-token chunk of "x" is in flight
    core.abort("x")
    seq = core.make_sequence("x", PROMPTS[1], params)
    core.add(seq)
    pieces = []
    while core.has_work():
        pieces.extend(o.piece for o in core.step())
    scored = pieces[0].prompt_logprobs
    assert len(scored) == seq.prompt_len
    assert [e.token_id for e in scored[1:]] == seq.prompt_token_ids[1:]
    core.release()


def test_chat_logprob_bytes_are_each_tokens_own_even_inside_a_character():
    """A byte-level tokenizer splits an emoji over tokens that each decode to U+FFFD:
    their ``bytes`` are the bytes of their vocabulary pieces (they were U+FFFD's
    EF BF BD), so the tokens' bytes joined are the text's UTF-8; whole tokens keep
    their text's UTF-8, top logprobs too. Byte-fallback pieces name their byte."""
    from chat_tokenizers import llama3_tokenizer
    from mii.response import TokenLogprob
    from mii.rpc.http.openai_logprobs import LogprobFormatter
    from mii.rpc.http.token_bytes import piece_bytes

    tokenizer = llama3_tokenizer()
    text = "cats 🐱 and é"
    ids = tokenizer.encode(text, add_special_tokens=False)
    entries = [TokenLogprob(i, -0.5, [(i, -0.5), (ids[0], -1.0)]) for i in ids]
    content = LogprobFormatter(tokenizer, chat=True).choice_logprobs(entries)["content"]
    assert any(item["token"].endswith("\ufffd") for item in content)  # the split emoji
    assert bytes(b for item in content for b in item["bytes"]) == text.encode()
    for item in content:
        assert item["top_logprobs"][0]["bytes"] == item["bytes"]
        if "\ufffd" not in item["token"]:
            assert item["bytes"] == list(item["token"].encode())
    assert piece_bytes("<0xE2>") == b"\xe2" and piece_bytes("Ġhi") == b" hi"
    assert piece_bytes("▁hi") is None  # a SentencePiece word: not bytes


def test_tokens_as_token_ids_keep_tokens_that_decode_alike_apart():
    """vLLM's return_tokens_as_token_ids: every token named "token_id:N". The split
    emoji's byte pieces all decode to U+FFFD, so its top_logprobs keyed by text kept
    one of them (the logprob of another token); by id each keeps its own. Offsets
    still count the text's characters; chat's bytes stay the token's own."""
    from chat_tokenizers import llama3_tokenizer
    from mii.response import TokenLogprob
    from mii.rpc.http.openai_logprobs import LogprobFormatter

    tokenizer = llama3_tokenizer()
    text = "cats 🐱 and é"
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces = [i for i in ids if tokenizer.decode([i]) == "\ufffd"]
    assert len(pieces) >= 2  # the emoji's pieces decode alike
    entries = [TokenLogprob(i, -0.5, [(p, -1.0 - k) for k, p in enumerate(pieces)]) for i in ids]

    def completion(token_ids: bool) -> dict:
        formatter = LogprobFormatter(tokenizer, chat=False, token_ids=token_ids)
        return formatter.choice_logprobs(entries, text=text)

    by_text, by_id = completion(False), completion(True)
    assert by_id["tokens"] == [f"token_id:{i}" for i in ids]
    assert len(by_text["top_logprobs"][0]) < len(pieces) + 1  # collided
    for i, top in zip(ids, by_id["top_logprobs"], strict=True):
        expected = {f"token_id:{p}": -1.0 - k for k, p in enumerate(pieces)}
        expected.setdefault(f"token_id:{i}", -0.5)
        assert top == expected
    assert by_id["text_offset"] == by_text["text_offset"]
    assert by_id["token_logprobs"] == by_text["token_logprobs"]

    plain = LogprobFormatter(tokenizer, chat=True).choice_logprobs(entries)["content"]
    named = LogprobFormatter(tokenizer, chat=True, token_ids=True).choice_logprobs(entries)
    for i, a, b in zip(ids, plain, named["content"], strict=True):
        assert b["token"] == f"token_id:{i}" and b["bytes"] == a["bytes"]
        assert [t["token"] for t in b["top_logprobs"]] == [f"token_id:{p}" for p in pieces]


def test_return_tokens_as_token_ids_over_http(served, tokenizer):
    """The request field reaches both routes' logprobs, streamed too; it is no
    longer refused."""
    _, _, url, _ = served
    oai = openai_client(url)
    prompt_ids = tokenizer(PROMPTS[0]).input_ids
    asked = dict(model=None, temperature=0, extra_body={"return_tokens_as_token_ids": True})
    result = oai.completions.create(prompt=prompt_ids, max_tokens=3, logprobs=2, echo=True, **asked)
    lp = result.choices[0].logprobs
    assert lp.tokens[: len(prompt_ids)] == [f"token_id:{i}" for i in prompt_ids]
    assert all(t.startswith("token_id:") for top in lp.top_logprobs[1:] for t in top)
    streamed = []
    for chunk in oai.completions.create(
        prompt=prompt_ids, max_tokens=3, logprobs=2, stream=True, **asked
    ):
        if chunk.choices and chunk.choices[0].logprobs:
            streamed.extend(chunk.choices[0].logprobs.tokens)
    assert streamed == lp.tokens[len(prompt_ids) :]
    messages = [{"role": "user", "content": "the quick brown fox"}]
    chat = oai.chat.completions.create(
        messages=messages, max_tokens=3, logprobs=True, top_logprobs=2, **asked
    )
    content = chat.choices[0].logprobs.content
    assert all(e.token.startswith("token_id:") for e in content)
    assert all(t.token.startswith("token_id:") for e in content for t in e.top_logprobs)
