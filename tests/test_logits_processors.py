"""Logits processors (issue 16, item 4), batched: each row of a mixed batch equals
transformers' logits processor for its own setting (repetition penalty, min_p,
sequence bias) or OpenAI's formula (presence and frequency penalties), and a
token still on the device (async scheduling) is counted."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from transformers import (
    MinPLogitsWarper,
    PrefixConstrainedLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    TemperatureLogitsWarper,
)

from mii.config import GenerateParams
from mii.engine import logits_processors
from mii.engine.sampler import sample, sample_next_tokens, sampling_batch
from mii.engine.sequence import PENDING_TOKEN, Sequence

VOCAB = 64
PROMPT = [3, 5, 5, 9, 11, 3]
GENERATED = [9, 20, 20, 20, 7, 5]


def make_seq(params: dict, prompt=PROMPT, generated=GENERATED, seed=0) -> Sequence:
    seq = Sequence("r", list(prompt), GenerateParams.parse(**params), 32, seed)
    seq.token_ids.extend(generated)
    return seq


def processed(logits: torch.Tensor, seqs: list[Sequence], pending=None) -> torch.Tensor:
    """The batched transform of ``logits`` [S, V], as the sampler applies it."""
    batch = sampling_batch(seqs, VOCAB, logits.device, pending)
    assert batch.processing is not None
    return logits_processors.apply(logits, batch.processing, batch.temperature)


def random_logits(rows: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, VOCAB, generator=gen)


def openai_penalties(row: torch.Tensor, generated: list[int], presence, frequency):
    """OpenAI's formula, one token at a time."""
    out = row.clone()
    for token, count in Counter(generated).items():
        out[token] -= frequency * count + presence * (count > 0)
    return out


def hf(processor, ids: list[int], row: torch.Tensor) -> torch.Tensor:
    return processor(torch.tensor([ids]), row[None].clone())[0]


def test_mixed_batch_equals_transformers_and_openai_row_by_row():
    settings = [
        {},  # plain: unchanged
        {"repetition_penalty": 1.7},
        {"repetition_penalty": 0.6},
        {"presence_penalty": 1.5, "frequency_penalty": 0.5},
        {"presence_penalty": -0.7, "frequency_penalty": -2.0},
        {"logit_bias": {4: 7.5, 9: -100.0, 63: 100.0}},
        {"logit_bias": {20: -3.0}, "repetition_penalty": 1.3, "frequency_penalty": 1.0},
        {"min_p": 0.1, "temperature": 1.5},
        {"min_p": 0.05},
        {"temperature": 0.9},
    ]
    seqs = [make_seq(s) for s in settings]
    logits = random_logits(len(seqs))
    before = logits.clone()
    out = processed(logits, seqs)
    assert torch.equal(logits, before), "the caller's logits were modified"
    ids = PROMPT + GENERATED

    assert torch.equal(out[0], logits[0]) and torch.equal(out[9], logits[9])
    for row, penalty in ((1, 1.7), (2, 0.6)):
        want = hf(RepetitionPenaltyLogitsProcessor(penalty), ids, logits[row])
        assert torch.equal(out[row], want)
        assert not torch.equal(out[row], logits[row])
    for row, (presence, frequency) in ((3, (1.5, 0.5)), (4, (-0.7, -2.0))):
        want = openai_penalties(logits[row], GENERATED, presence, frequency)
        torch.testing.assert_close(out[row], want, rtol=0, atol=1e-6)
    want = hf(SequenceBiasLogitsProcessor({(4,): 7.5, (9,): -100.0, (63,): 100.0}), ids, logits[5])
    assert torch.equal(out[5], want)
    # bias first, then the repetition penalty (transformers' order), then OpenAI's
    want = hf(SequenceBiasLogitsProcessor({(20,): -3.0}), ids, logits[6])
    want = hf(RepetitionPenaltyLogitsProcessor(1.3), ids, want)
    want = openai_penalties(want, GENERATED, 0.0, 1.0)
    torch.testing.assert_close(out[6], want, rtol=0, atol=1e-6)
    # min_p after temperature; the sampler divides by the temperature afterwards
    for row, (min_p, temperature) in ((7, (0.1, 1.5)), (8, (0.05, 1.0))):
        warped = hf(TemperatureLogitsWarper(temperature), ids, logits[row])
        want = hf(MinPLogitsWarper(min_p), ids, warped)
        got = out[row] / temperature
        assert torch.equal(torch.isinf(got), torch.isinf(want))
        assert 1 < int(torch.isfinite(got).sum()) < VOCAB
        kept = torch.isfinite(want)
        torch.testing.assert_close(got[kept], want[kept])


def test_allowed_token_ids_mask_their_rows_only():
    """Rows with allowed_token_ids equal transformers' PrefixConstrainedLogitsProcessor
    (every other token -inf); the other rows of the batch are left as they are,
    with a bias applied after the mask."""
    settings = [
        {"allowed_token_ids": [4, 9, 63]},
        {},
        {"allowed_token_ids": [0], "logit_bias": {0: 2.0, 5: 50.0}},
        {"repetition_penalty": 1.5},
    ]
    seqs = [make_seq(s) for s in settings]
    logits = random_logits(len(seqs), seed=4)
    out = processed(logits, seqs)
    ids = PROMPT + GENERATED
    want = hf(PrefixConstrainedLogitsProcessor(lambda b, sent: [4, 9, 63], 1), ids, logits[0])
    assert torch.equal(out[0], want)
    assert torch.equal(out[1], logits[1])
    assert torch.isfinite(out[2]).tolist() == [t == 0 for t in range(VOCAB)]
    assert out[2, 0] == logits[2, 0] + 2.0  # the bias on top; token 5 stays banned
    assert torch.equal(out[3], hf(RepetitionPenaltyLogitsProcessor(1.5), ids, logits[3]))
    greedy = [make_seq({"do_sample": False, **settings[0]})]
    assert sample_next_tokens(logits[:1], greedy, [], VOCAB)[0].tolist() == [int(want.argmax())]


def test_greedy_rows_see_the_processed_logits():
    """Penalties and biases change greedy picks: they run before the argmax."""
    logits = random_logits(3, seed=1)
    top = logits.argmax(dim=-1).tolist()
    seqs = [
        make_seq({"do_sample": False, "logit_bias": {top[0]: -100.0}}),
        make_seq({"do_sample": False, "logit_bias": {17: 100.0}}),
        make_seq({"do_sample": False}),
    ]
    tokens = sample_next_tokens(logits, seqs, eos_token_ids=[], vocab_size=VOCAB)[0].tolist()
    assert tokens[0] != top[0] and tokens[1] == 17 and tokens[2] == top[2]


def test_a_sampled_row_with_a_forcing_bias_draws_that_token():
    logits = random_logits(4, seed=2)
    seqs = [make_seq({"logit_bias": {33: 100.0}, "temperature": 1.0}, seed=s) for s in range(4)]
    assert sample_next_tokens(logits, seqs, [], VOCAB)[0].tolist() == [33] * 4


def test_stop_token_ids_are_banned_below_min_new_tokens_only():
    logits = torch.zeros(3, VOCAB)
    logits[:, 8] = 10.0  # the stop token would win
    seqs = [
        make_seq({"stop_token_ids": [8], "min_new_tokens": 9, "do_sample": False}),
        make_seq({"stop_token_ids": [8], "min_new_tokens": 9, "ignore_eos": True}),
        make_seq({"stop_token_ids": [8], "min_new_tokens": 3, "do_sample": False}),  # past it
    ]
    out = processed(logits, seqs)
    assert torch.isinf(out[0, 8]) and torch.isinf(out[1, 8])
    assert torch.equal(out[2], logits[2])
    # Past min_new_tokens nothing is left to do: the batch gets no processing at all.
    assert logits_processors.plan(seqs[2:], VOCAB) is None


def test_counts_include_the_token_still_on_the_device():
    """Async scheduling: the last token is PENDING_TOKEN on the host and its value
    is a row of the in-flight pass's sampled tokens; it is filled in on the device."""
    params = {"repetition_penalty": 2.0, "presence_penalty": 1.0, "frequency_penalty": 0.5}
    known = make_seq(params, generated=[*GENERATED, 41])
    waiting = make_seq(params, generated=[*GENERATED, PENDING_TOKEN])
    waiting.pending_row = 1
    pending = torch.tensor([0, 41, 2])  # the in-flight pass's tokens
    logits = random_logits(1, seed=3)
    want = processed(logits, [known])
    got = processed(logits, [waiting], pending)
    assert torch.equal(got, want)
    assert not torch.equal(processed(logits, [make_seq(params)]), want)  # 41 counts


def test_plain_batches_get_no_processing():
    """No request sets an option: decided on the host, nothing uploaded or applied."""
    plain = [make_seq({}), make_seq({"do_sample": False}), make_seq({"stop_token_ids": [5]})]
    assert all(not s.params.processes_logits for s in plain)
    assert logits_processors.plan(plain, VOCAB) is None
    batch = sampling_batch(plain, VOCAB, torch.device("cpu"))
    assert batch.processing is None
    logits = random_logits(3, seed=4)
    assert torch.equal(sample(logits, batch, []), sample(logits, batch, []))


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("repetition_penalty", float("inf")),
        ("min_p", 1.5),
        ("min_p", -0.1),
        ("presence_penalty", 2.5),
        ("frequency_penalty", -2.01),
        ("logit_bias", {5: 101.0}),
        ("logit_bias", {-1: 1.0}),
        ("logit_bias", {5: float("nan")}),
        ("stop_token_ids", [-3]),
        ("stop_token_ids", [True]),
    ],
)
def test_invalid_values_name_the_option(option, value):
    from mii.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError) as err:
        GenerateParams.parse(**{option: value})
    assert err.value.field == option


def test_min_tokens_is_another_name_of_min_new_tokens():
    from mii.errors import InvalidRequestError

    assert GenerateParams.parse(min_tokens=4).min_new_tokens == 4
    assert GenerateParams.parse(min_tokens=4, min_new_tokens=4).min_new_tokens == 4
    for bad in ({"min_tokens": 4, "min_new_tokens": 2}, {"min_tokens": -1}):
        with pytest.raises(InvalidRequestError) as err:
            GenerateParams.parse(**bad)
        assert err.value.field == "min_tokens"
