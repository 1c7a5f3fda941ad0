"""Sampling options end to end in the engine (issue 16, item 4): greedy answers with
``repetition_penalty`` equal transformers' ``generate(repetition_penalty=...)``,
presence and frequency penalties equal a hand-computed reference, in a mixed
batch, with chunked prefill and preemption, and with async scheduling (a token
still on the device counts); ``logit_bias``, ``min_p``, ``stop_token_ids``,
``allowed_token_ids``, ``skip_special_tokens`` and the vocabulary checks of token ids."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
import torch

import mii
from helpers import PROMPTS, TIGHT_OPTIONS, _hf_generate, hf_greedy
from mii.errors import InvalidRequestError

NEW = 24


def hf_repetition(model, tokenizer, prompt: str, penalty: float) -> list[int]:
    eos = tokenizer.eos_token_id
    ids, out = _hf_generate(
        model, tokenizer, prompt, NEW, eos_token_id=eos, repetition_penalty=penalty
    )
    return out[0, ids.shape[1] :].tolist()


def reference_openai_penalties(model, tokenizer, prompt: str, presence, frequency) -> list[int]:
    """Greedy decoding with OpenAI's penalties over the generated tokens, by hand."""
    ids = tokenizer(prompt).input_ids
    generated: list[int] = []
    with torch.no_grad():
        for _ in range(NEW):
            logits = model(torch.tensor([ids + generated])).logits[0, -1].double()
            for token, count in Counter(generated).items():
                logits[token] -= frequency * count + presence * (count > 0)
            generated.append(int(logits.argmax()))
            if generated[-1] == tokenizer.eos_token_id:
                break
    return generated


@pytest.fixture(scope="module")
def model(checkpoints):
    path, hf_model = checkpoints("llama")
    return str(path), hf_model


@pytest.fixture(scope="module")
def cases(model, tokenizer) -> list[tuple[str, dict, list[int]]]:
    """(prompt, options, reference) of one mixed batch: rows with different settings."""
    _, hf_model = model
    rp = hf_repetition
    return [
        (PROMPTS[0], {"repetition_penalty": 1.6}, rp(hf_model, tokenizer, PROMPTS[0], 1.6)),
        (PROMPTS[1], {"repetition_penalty": 0.7}, rp(hf_model, tokenizer, PROMPTS[1], 0.7)),
        (PROMPTS[2], {}, hf_greedy(hf_model, tokenizer, PROMPTS[2], NEW)),
        (
            PROMPTS[3],
            {"presence_penalty": 1.2, "frequency_penalty": 0.8},
            reference_openai_penalties(hf_model, tokenizer, PROMPTS[3], 1.2, 0.8),
        ),
        (
            PROMPTS[0],
            {"presence_penalty": -0.5, "frequency_penalty": -1.5},
            reference_openai_penalties(hf_model, tokenizer, PROMPTS[0], -0.5, -1.5),
        ),
    ]


def test_the_penalties_change_the_answers(model, tokenizer, cases):
    """Guard: matching the references below proves the penalties are applied."""
    _, hf_model = model
    for prompt, options, reference in cases:
        if options:
            assert reference != hf_greedy(hf_model, tokenizer, prompt, NEW), options


def run_batch(path: str, requests: list[tuple[str, dict]], **engine_options):
    """Every request submitted at once to one engine (a mixed batch); their responses
    and the engine's stats."""

    async def main():
        async with mii.AsyncEngine(path, **engine_options) as engine:
            answers = await asyncio.gather(
                *(engine.generate([prompt], **options) for prompt, options in requests)
            )
            return [a[0] for a in answers], engine.stats()

    return asyncio.run(main())


@pytest.mark.parametrize(
    "engine_options",
    [{}, TIGHT_OPTIONS, {**TIGHT_OPTIONS, "async_scheduling": True}],
    ids=["plain", "chunked-preempted", "chunked-preempted-async"],
)
def test_penalised_greedy_answers_equal_the_references(model, tokenizer, cases, engine_options):
    requests = [(p, {"do_sample": False, "max_new_tokens": NEW, **o}) for p, o, _ in cases]
    responses, stats = run_batch(model[0], requests, **engine_options)
    for (prompt, options, reference), response in zip(cases, responses):
        assert response.token_ids == reference, (prompt, options)
        assert response.generated_text == tokenizer.decode(reference, skip_special_tokens=True)
    if engine_options:
        assert stats["preemptions"] > 0, "the KV pool was meant to force preemption"


@pytest.fixture(scope="module")
def pipe(model):
    with mii.pipeline(model[0]) as p:
        yield p


def test_logit_bias_forces_and_bans_tokens(pipe, tokenizer):
    plain = pipe([PROMPTS[1]], do_sample=False, max_new_tokens=4)[0].token_ids
    forced = 7
    for sampling in ({"do_sample": False}, {"seed": 3, "temperature": 1.3}):
        response = pipe([PROMPTS[1]], max_new_tokens=4, logit_bias={forced: 100}, **sampling)[0]
        assert response.token_ids == [forced] * 4
    banned = pipe([PROMPTS[1]], do_sample=False, max_new_tokens=4, logit_bias={plain[0]: -100})
    assert banned[0].token_ids[0] != plain[0]


def test_allowed_token_ids_equal_transformers_prefix_constraint(model, pipe, tokenizer):
    """vLLM's ``allowed_token_ids``: the greedy answer equals transformers'
    ``generate`` constrained to those ids (``prefix_allowed_tokens_fn``), and
    sampled answers draw only them."""
    _, hf_model = model
    plain = pipe([PROMPTS[1]], do_sample=False, max_new_tokens=8)[0].token_ids
    allowed = sorted({3, 7, 11, 19, plain[0] + 1} - {plain[0]})  # not its own first pick
    ids, out = _hf_generate(
        hf_model,
        tokenizer,
        PROMPTS[1],
        8,
        eos_token_id=tokenizer.eos_token_id,
        prefix_allowed_tokens_fn=lambda batch, sent: allowed,
    )
    reference = out[0, ids.shape[1] :].tolist()
    greedy = pipe([PROMPTS[1]], do_sample=False, max_new_tokens=8, allowed_token_ids=allowed)
    assert greedy[0].token_ids == reference and set(reference) <= set(allowed)
    assert reference[0] != plain[0]  # guard: the constraint changed the answer
    for seed in (1, 2):
        sampled = pipe(
            [PROMPTS[1]], seed=seed, temperature=1.5, max_new_tokens=8, allowed_token_ids=allowed
        )
        assert set(sampled[0].token_ids) <= set(allowed)


def test_allowed_tokens_all_banned_below_min_new_tokens_are_refused(pipe, tokenizer):
    """allowed_token_ids of only end-of-sequence / stop tokens with min_new_tokens left
    nothing to sample: the sampler drew tokens outside the list (user trial). Refused,
    naming the option; with another token allowed, only allowed tokens come out."""
    eos = tokenizer.eos_token_id
    for extra in ({}, {"stop_token_ids": [7], "allowed_token_ids": [eos, 7]}):
        options = {"allowed_token_ids": [eos], "min_new_tokens": 3, **extra}
        with pytest.raises(mii.InvalidRequestError, match="no token is left") as err:
            pipe([PROMPTS[1]], max_new_tokens=4, **options)
        assert err.value.field == "allowed_token_ids"
    [answer] = pipe(
        [PROMPTS[1]], allowed_token_ids=[eos, 9], min_new_tokens=3, max_new_tokens=4, seed=1
    )
    assert answer.token_ids[:3] == [9, 9, 9] and set(answer.token_ids) <= {eos, 9}


@pytest.mark.parametrize(
    "extreme",
    [{"temperature": 1e30}, {"repetition_penalty": 1e-20}, {"repetition_penalty": 1e20}],
    ids=["temperature", "small-penalty", "large-penalty"],
)
def test_the_extreme_allowed_values_keep_the_constraints(pipe, extreme):
    """At the bounds of temperature and repetition_penalty the 32-bit logits stay
    numbers: allowed_token_ids, min_new_tokens and a grammar still hold. (Past them,
    3.5e38 and 1e-46, the masked logits became NaN: tokens outside the list, EOS
    below min_new_tokens, and a grammar's "rejected token" 500; fuzzing.)"""
    [answer] = pipe(
        [PROMPTS[1] + " " + PROMPTS[1]],  # its tokens repeat: the penalty applies
        allowed_token_ids=[9, 10],
        min_new_tokens=6,
        max_new_tokens=6,
        seed=3,
        **extreme,
    )
    assert set(answer.token_ids) <= {9, 10} and answer.generated_length == 6
    [chosen] = pipe([PROMPTS[1]], choice=["yes", "no"], seed=3, max_new_tokens=8, **extreme)
    assert chosen.generated_text in ("yes", "no") and chosen.finish_reason == "stop"


def test_min_p_one_keeps_only_the_most_likely_token(pipe):
    greedy = pipe([PROMPTS[2]], do_sample=False, max_new_tokens=12)[0].token_ids
    for seed in (1, 2):
        sampled = pipe([PROMPTS[2]], seed=seed, temperature=1.5, top_p=1.0, max_new_tokens=12)
        assert sampled[0].token_ids != greedy  # guard: these seeds do sample
        kept = pipe([PROMPTS[2]], seed=seed, temperature=1.5, min_p=1.0, max_new_tokens=12)
        assert kept[0].token_ids == greedy


def test_stop_token_ids_end_generation_unless_below_min_new_tokens(pipe, tokenizer):
    greedy = pipe([PROMPTS[0]], do_sample=False, max_new_tokens=NEW)[0].token_ids
    at = next(i for i in range(2, NEW) if greedy[i] not in greedy[:i])  # first seen there
    stop = greedy[at]
    response = pipe([PROMPTS[0]], do_sample=False, max_new_tokens=NEW, stop_token_ids=[stop])[0]
    assert response.finish_reason == "stop"
    assert response.token_ids == greedy[: at + 1] and response.generated_length == at + 1
    assert response.generated_text == tokenizer.decode(greedy[:at])  # the stop token left out
    assert response.stop_reason == stop  # which stop ended it (vLLM's stop_reason)
    # vLLM's include_stop_str_in_output decodes the stop token too.
    [shown] = pipe(
        [PROMPTS[0]],
        do_sample=False,
        max_new_tokens=NEW,
        stop_token_ids=[stop],
        include_stop_str_in_output=True,
    )
    assert shown.token_ids == response.token_ids and shown.stop_reason == stop
    assert shown.generated_text == tokenizer.decode(greedy[: at + 1])
    assert len(shown.generated_text) > len(response.generated_text)
    # ignore_eos does not apply to stop token ids, min_new_tokens bans them before it.
    late = pipe(
        [PROMPTS[0]],
        do_sample=False,
        max_new_tokens=NEW,
        min_tokens=at + 2,
        stop_token_ids=[stop],
        ignore_eos=True,
    )[0]
    assert late.token_ids[at] != stop and late.generated_length >= at + 2
    assert stop not in late.token_ids[: at + 2]


def test_skip_special_tokens_false_keeps_them_in_the_text(pipe, tokenizer):
    bos = tokenizer.bos_token_id
    assert bos != tokenizer.eos_token_id
    options = dict(do_sample=False, max_new_tokens=3, logit_bias={bos: 100})
    skipped = pipe([PROMPTS[2]], **options)[0]
    kept = pipe([PROMPTS[2]], skip_special_tokens=False, **options)[0]
    assert skipped.token_ids == kept.token_ids == [bos] * 3
    assert skipped.generated_text == ""
    assert kept.generated_text == tokenizer.bos_token * 3


def test_token_ids_are_checked_against_the_vocabulary(pipe):
    vocab = pipe.engine.core.vocab_size
    for option, value in (
        ("logit_bias", {vocab: 1.0}),
        ("stop_token_ids", [vocab + 5]),
        ("allowed_token_ids", [1, vocab]),
    ):
        with pytest.raises(InvalidRequestError, match="vocabulary") as err:
            pipe([PROMPTS[0]], max_new_tokens=2, **{option: value})
        assert err.value.field == option
    # The engine still serves.
    assert pipe([PROMPTS[0]], max_new_tokens=2, ignore_eos=True)[0].generated_length == 2
