"""Batched sampling: greedy, EOS ban, top-k / top-p, temperature and counter-based noise."""

from __future__ import annotations

import math
import random

import pytest
import torch

from mii.engine.sampler import SamplingBatch, _mul32, counter_uniform, sample


def make_batch(
    n: int,
    vocab: int,
    *,
    greedy=False,
    temperature=1.0,
    top_k=None,
    top_p=1.0,
    seeds=0,
    steps=0,
    ban_eos=False,
) -> SamplingBatch:
    def col(value, dtype):
        values = list(value) if isinstance(value, list | tuple | range) else [value] * n
        assert len(values) == n
        return torch.tensor(values, dtype=dtype)

    return SamplingBatch(
        greedy=col(greedy, torch.bool),
        temperature=col(temperature, torch.float32),
        top_k=col(vocab if top_k is None else top_k, torch.int64),
        top_p=col(top_p, torch.float32),
        seeds=col(seeds, torch.int64),
        steps=col(steps, torch.int64),
        ban_eos=col(ban_eos, torch.bool),
    )


def random_logits(rows: int, vocab: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=gen) * scale


def counts_of(tokens: torch.Tensor, vocab: int) -> list[int]:
    return torch.bincount(tokens, minlength=vocab).tolist()


def chi_square(counts: list[int], probs: list[float]) -> float:
    total = sum(counts)
    stat = 0.0
    for observed, p in zip(counts, probs):
        if p == 0.0:
            assert observed == 0, "a token of probability 0 was sampled"
            continue
        expected = total * p
        stat += (observed - expected) ** 2 / expected
    return stat


# Upper 1e-4 quantiles of the chi-square distribution, by degrees of freedom. The
# draws are deterministic (fixed seeds), so the tests cannot flake.
CHI2_CRITICAL = {1: 15.1, 2: 18.4, 3: 21.1, 4: 23.5, 5: 25.7, 7: 29.9}


def assert_matches(counts: list[int], probs: list[float]) -> None:
    dof = sum(p > 0 for p in probs) - 1
    stat = chi_square(counts, probs)
    assert stat < CHI2_CRITICAL[dof], f"chi2={stat:.1f} counts={counts} probs={probs}"


def draw(logits_row: torch.Tensor, n: int, vary: str = "seed", **kw) -> torch.Tensor:
    """``n`` samples of one distribution, each with its own seed (or own step)."""
    vocab = logits_row.shape[-1]
    logits = logits_row.expand(n, vocab).contiguous()
    if vary == "seed":
        kw.setdefault("seeds", range(10_000, 10_000 + n))
    else:
        kw.setdefault("seeds", 987_654_321)
        kw.setdefault("steps", range(n))
    return sample(logits, make_batch(n, vocab, **kw), eos_token_ids=[])


# ----- the hash ----------------------------------------------------------------------


def test_mul32_is_multiplication_mod_2_32():
    rng = random.Random(0)
    xs = [0, 1, 0xFFFF, 0x10000, 0xFFFFFFFF, *(rng.getrandbits(32) for _ in range(200))]
    for constant in (0x7FEB352D, 0x846CA68B, 0xFFFFFFFF, 3):
        got = _mul32(torch.tensor(xs, dtype=torch.int64), constant).tolist()
        assert got == [(x * constant) % 2**32 for x in xs]


def test_counter_uniform_is_in_open_unit_interval_and_uniform():
    seeds = torch.arange(64, dtype=torch.int64) * 1_000_003 + (2**63 - 10_000_000_000)
    u = counter_uniform(seeds, torch.arange(64, dtype=torch.int64), 1000)
    assert u.shape == (64, 1000)
    assert bool((u > 0).all()) and bool((u < 1).all())
    assert abs(u.mean().item() - 0.5) < 0.005
    assert abs(u.var().item() - 1 / 12) < 0.002
    deciles = torch.histc(u.float(), bins=10, min=0.0, max=1.0).tolist()
    expected = u.numel() / 10
    assert all(abs(d - expected) < 0.03 * expected for d in deciles)


def test_counter_uniform_depends_on_seed_and_step_only():
    seeds = torch.tensor([5, 5, 6, 5], dtype=torch.int64)
    steps = torch.tensor([0, 1, 0, 0], dtype=torch.int64)
    u = counter_uniform(seeds, steps, 50)
    assert torch.equal(u[0], u[3])
    assert not torch.equal(u[0], u[1])
    assert not torch.equal(u[0], u[2])
    # A wider vocabulary extends the row; the shared columns keep their values.
    wide = counter_uniform(seeds, steps, 80)
    assert torch.equal(wide[:, :50], u)


# ----- greedy ----------------------------------------------------------------------


def test_greedy_equals_argmax():
    logits = random_logits(16, 97, seed=1)
    out = sample(logits, make_batch(16, 97, greedy=True, seeds=range(16)), eos_token_ids=[])
    assert out.dtype == torch.int64
    assert torch.equal(out, logits.argmax(dim=-1))


def test_greedy_rows_in_a_mixed_batch_equal_argmax():
    logits = random_logits(12, 40, seed=2, scale=0.5)  # flat: sampling rarely picks argmax
    greedy = [i % 2 == 0 for i in range(12)]
    batch = make_batch(12, 40, greedy=greedy, seeds=range(12), temperature=2.0)
    out = sample(logits, batch, eos_token_ids=[])
    argmax = logits.argmax(dim=-1)
    for i in range(12):
        if greedy[i]:
            assert out[i] == argmax[i]
    sampled_rows = [i for i in range(12) if not greedy[i]]
    assert any(out[i] != argmax[i] for i in sampled_rows)


# ----- EOS ban (min_new_tokens) -----------------------------------------------------


def test_ban_eos_blocks_eos_in_greedy_rows_only_where_banned():
    vocab, eos = 10, 2
    logits = torch.zeros(3, vocab)
    logits[:, eos] = 10.0
    logits[:, 7] = 5.0
    batch = make_batch(3, vocab, greedy=True, ban_eos=[True, False, True])
    out = sample(logits, batch, eos_token_ids=[eos]).tolist()
    assert out == [7, eos, 7]


def test_ban_eos_covers_every_eos_id_when_sampling():
    vocab, n = 12, 2000
    row = torch.zeros(vocab)
    row[0], row[1] = 6.0, 6.0  # two EOS ids hold almost all the mass
    logits = row.expand(n, vocab).contiguous()
    batch = make_batch(n, vocab, seeds=range(n), ban_eos=True)
    out = sample(logits, batch, eos_token_ids=[0, 1])
    assert not bool(((out == 0) | (out == 1)).any())
    assert len(set(out.tolist())) > 5  # the rest of the vocabulary is still sampled
    # Without the ban, EOS is nearly always drawn.
    free = sample(logits, make_batch(n, vocab, seeds=range(n)), eos_token_ids=[0, 1])
    assert ((free == 0) | (free == 1)).float().mean().item() > 0.9


def test_ban_eos_does_not_modify_the_callers_logits():
    logits = random_logits(2, 8, seed=3)
    copy = logits.clone()
    sample(logits, make_batch(2, 8, ban_eos=True, seeds=[1, 2]), eos_token_ids=[3])
    assert torch.equal(logits, copy)


# ----- top-k / top-p ----------------------------------------------------------------


def test_top_k_1_equals_greedy():
    logits = random_logits(64, 50, seed=4, scale=1.0)
    batch = make_batch(64, 50, top_k=1, temperature=1.7, seeds=range(64), steps=range(64))
    assert torch.equal(sample(logits, batch, eos_token_ids=[]), logits.argmax(dim=-1))


def test_tiny_top_p_equals_greedy():
    logits = random_logits(64, 50, seed=5, scale=1.0)
    batch = make_batch(64, 50, top_p=1e-6, temperature=1.3, seeds=range(64))
    assert torch.equal(sample(logits, batch, eos_token_ids=[]), logits.argmax(dim=-1))


def test_top_k_keeps_only_the_k_most_likely():
    row = torch.tensor([0.0, 3.0, 1.0, 2.5, -1.0, 2.0, 0.5, 1.5])
    out = draw(row, 4000, top_k=3)
    assert set(out.tolist()) == {1, 3, 5}
    kept = torch.softmax(row[[1, 3, 5]], dim=0).tolist()
    counts = counts_of(out, 8)
    assert_matches([counts[1], counts[3], counts[5]], kept)


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    out = draw(probs.log(), 4000, top_p=0.7)  # 0.5 + 0.3 >= 0.7: tokens 1 and 3
    counts = counts_of(out, 4)
    assert counts[0] == counts[2] == 0
    assert_matches([counts[1], counts[3]], [0.5 / 0.8, 0.3 / 0.8])


def test_top_k_then_top_p_match_transformers_warpers():
    # Transformers (and vLLM) apply top-p to the distribution left after top-k,
    # renormalised. Here top-k keeps tokens 0 and 1 ([0.4, 0.35] -> [0.53, 0.47]);
    # token 0 alone then reaches top_p=0.5, so only token 0 may be drawn.
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    logits = torch.tensor([0.4, 0.35, 0.25]).log()
    reference = TopPLogitsWarper(0.5)(None, TopKLogitsWarper(2)(None, logits[None]))[0]
    allowed = {i for i in range(3) if reference[i] > float("-inf")}
    out = draw(logits, 500, top_k=2, top_p=0.5)
    assert set(out.tolist()) <= allowed, f"drew {sorted(set(out.tolist()))}, allowed {allowed}"


# ----- seeds --------------------------------------------------------------------------


def test_same_seed_and_step_give_same_token_in_any_batch():
    vocab = 64
    target = random_logits(1, vocab, seed=6, scale=0.7)[0]
    others = random_logits(7, vocab, seed=7, scale=0.7)
    for seed in (0, 1, 12345, 2**63 - 1):
        for step in range(4):
            alone = sample(
                target[None], make_batch(1, vocab, seeds=seed, steps=step), eos_token_ids=[]
            ).item()
            for position in (0, 3, 7):
                logits = torch.cat([others[:position], target[None], others[position:]])
                seeds = [(seed + 1 + i) % 2**63 for i in range(8)]
                steps = [step + 2 + i for i in range(8)]
                seeds[position], steps[position] = seed, step
                batch = make_batch(8, vocab, seeds=seeds, steps=steps)
                assert sample(logits, batch, eos_token_ids=[]).tolist()[position] == alone


def test_identical_requests_in_one_batch_draw_the_same_token():
    # Two identical requests in one batch (same seed, step and settings) agree.
    vocab = 30
    row = random_logits(1, vocab, seed=8, scale=0.5)
    logits = row.expand(6, vocab).contiguous()
    batch = make_batch(6, vocab, seeds=[42, 7, 42, 7, 42, 42], temperature=1.5, top_k=20)
    out = sample(logits, batch, eos_token_ids=[]).tolist()
    assert out[0] == out[2] == out[4] == out[5]
    assert out[1] == out[3]


def test_different_seeds_give_different_samples():
    vocab = 64
    row = torch.zeros(vocab)  # uniform
    by_seed = draw(row, 400)
    assert len(set(by_seed.tolist())) > 50
    by_step = draw(row, 400, vary="step")
    assert len(set(by_step.tolist())) > 50
    # Seeds that differ only in the high 32 bits give different noise too.
    hi = [(i << 32) | 5 for i in range(1, 401)]
    by_high_bits = draw(row, 400, seeds=hi)
    assert len(set(by_high_bits.tolist())) > 50


def test_sequences_of_samples_differ_between_seeds():
    vocab = 16
    row = torch.zeros(vocab)
    runs = []
    for seed in range(20):
        steps = range(12)
        logits = row.expand(12, vocab).contiguous()
        out = sample(logits, make_batch(12, vocab, seeds=seed, steps=steps), eos_token_ids=[])
        runs.append(tuple(out.tolist()))
    assert len(set(runs)) == 20


def test_noise_is_keyed_by_token_not_by_rank():
    # With the seed and step fixed, every token keeps its own noise value. Raising the
    # drawn token's logit, or lowering another token's, can then never change the draw,
    # although both reorder the sorted vocabulary.
    vocab = 20
    gen = torch.Generator().manual_seed(9)
    changed = 0
    for seed in range(150):
        logits = torch.randn(vocab, generator=gen)
        batch = make_batch(1, vocab, seeds=seed, steps=seed % 7)
        token = sample(logits[None], batch, eos_token_ids=[]).item()
        raised = logits.clone()
        raised[token] += 2.5
        assert sample(raised[None], batch, eos_token_ids=[]).item() == token
        other = (token + 1 + seed % (vocab - 1)) % vocab
        lowered = logits.clone()
        lowered[other] -= 2.5
        assert sample(lowered[None], batch, eos_token_ids=[]).item() == token
        changed += int(not torch.equal(raised.argsort(), logits.argsort()))
    assert changed > 0  # the edits did reorder the vocabulary


# ----- distributions ---------------------------------------------------------------


@pytest.mark.parametrize("vary", ["seed", "step"])
def test_empirical_frequencies_match_softmax(vary):
    logits = torch.tensor([1.0, 0.0, -0.5, 2.0, 0.3])
    probs = torch.softmax(logits, dim=0).tolist()
    out = draw(logits, 20_000, vary=vary)
    assert_matches(counts_of(out, 5), probs)


def test_sampling_is_not_just_argmax():
    logits = torch.tensor([1.0, 0.0, -0.5, 2.0, 0.3])
    counts = counts_of(draw(logits, 20_000), 5)
    # A sampler that ignores the noise would fail the frequency test; this checks
    # the second most likely token is drawn about as often as its probability.
    p = torch.softmax(logits, dim=0)[0].item()
    assert abs(counts[0] / 20_000 - p) < 0.02


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_scales_the_distribution(temperature):
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    probs = torch.softmax(logits / temperature, dim=0).tolist()
    out = draw(logits, 20_000, temperature=temperature)
    assert_matches(counts_of(out, 4), probs)


def test_lower_temperature_sharpens():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5, -2.0])
    top_share = []
    for temperature in (3.0, 1.0, 0.5, 0.2):
        out = draw(logits, 5000, temperature=temperature)
        top_share.append((out == 0).float().mean().item())
    assert top_share == sorted(top_share)
    assert top_share[0] < 0.5
    assert top_share[-1] > 0.95


def test_noise_does_not_dominate_a_peaked_distribution():
    # log(1e6): the top token has probability ~1 - 1e-5; it must win every draw.
    logits = torch.tensor([math.log(1e6), 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    out = draw(logits, 3000)
    assert (out == 0).sum().item() >= 2990
