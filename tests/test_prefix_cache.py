"""Automatic prefix caching: full KV blocks named by chained hashes, shared by
reference count, kept after their sequences end and evicted least recently used.

The scheduler tests check the block manager's invariants after every step; the
engine tests compare tokens with caching on, off, and transformers."""

from __future__ import annotations

import asyncio
import random

import pytest

import mii
from conftest import CHECKPOINTS
from helpers import PROMPTS, hf_greedy
from mii.config import GenerateParams
from mii.engine.kv_cache import BlockManager
from mii.engine.prefix_hash import block_hash
from mii.engine.scheduler import Scheduler
from mii.engine.sequence import Sequence, SequenceStatus
from test_family_mixtral import moe_checkpoints  # noqa: F401 (a fixture)

BLOCK = 4


def make_seq(name: str, prompt: list[int], max_new_tokens: int = 3, **params) -> Sequence:
    return Sequence(name, list(prompt), GenerateParams.parse(**params), max_new_tokens, 0)


def live(sched: Scheduler) -> list[Sequence]:
    return [*sched.running, *sched.waiting]


def step(sched: Scheduler, rng: random.Random | None = None) -> list[Sequence]:
    """One pass as the engine runs it (fake sampled tokens), invariants checked after."""
    out = sched.schedule()
    sampled = sched.commit(out)
    for seq in sampled:
        seq.token_ids.append(rng.randrange(3, 60) if rng else 7)
        if seq.num_generated >= seq.max_new_tokens:
            sched.finish(seq, "length")
    sched.blocks.check_invariants(live(sched))
    return [c.seq for c in out.chunks]


# ----- hashing and the block manager ---------------------------------------------


def test_a_block_hash_names_its_whole_prefix():
    root = b"salt"
    first = block_hash(root, [1, 2, 3, 4])
    assert block_hash(root, [1, 2, 3, 4]) == first and len(first) == 16
    # The same tokens after another prefix (or under another salt) are another block.
    assert block_hash(block_hash(root, [9, 9, 9, 9]), [1, 2, 3, 4]) != first
    assert block_hash(b"other", [1, 2, 3, 4]) != first
    assert block_hash(root, [1, 2, 3, 5]) != first


def test_blocks_are_shared_kept_and_evicted_least_recently_used():
    bm = BlockManager(6, BLOCK, prefix_caching=True)
    a = make_seq("a", range(10, 19))  # 9 tokens: 2 full blocks + 1
    assert bm.attach_prefix(a) == 0
    bm.allocate(a, a.num_tokens)
    a.num_computed = a.num_tokens
    bm.register(a)
    assert a.num_registered_blocks == 2
    # b shares a's first two blocks while a runs: reference counts 2.
    b = make_seq("b", [*range(10, 18), 50, 51])
    assert bm.attach_prefix(b) == 8 and b.block_table == a.block_table[:2]
    bm.check_invariants([a, b])
    bm.free(a)
    bm.free(b)
    bm.check_invariants([])
    assert bm.num_free == 6  # everything is free, and the two full blocks are still cached
    # An identical prompt later: found again (its last token is always computed).
    c = make_seq("c", range(10, 19))
    assert bm.attach_prefix(c) == 8
    bm.free(c)
    # Memory needed: blocks without cached content go first, then the least
    # recently used cached block (the end of a prefix before its start).
    d = make_seq("d", range(100, 120))
    bm.allocate(d, 20)  # 5 of the 6 blocks: the 4 plain ones, then the LRU cached one
    e = make_seq("e", range(10, 19))
    assert bm.attach_prefix(e) == 4  # only the prefix's first block is left
    bm.check_invariants([d, e])
    bm.free(e)
    bm.reset_prefix_cache()  # nothing cached is found any more
    assert bm.attach_prefix(make_seq("f", range(10, 19))) == 0
    bm.check_invariants([d])


def test_prompt_logprobs_requests_compute_their_whole_prompt():
    bm = BlockManager(8, BLOCK, prefix_caching=True)
    a = make_seq("a", range(10, 19))
    bm.allocate(a, 9)
    a.num_computed = 9
    bm.register(a)
    assert bm.attach_prefix(make_seq("b", range(10, 19), prompt_logprobs=0)) == 0


# ----- the scheduler -------------------------------------------------------------


def test_random_shared_prefix_workload_keeps_every_invariant():
    """Requests over a few shared prefixes, a pool that forces eviction and
    preemption, aborts of sequences whose blocks are shared; after every step the
    reference counts, free lists and hash table agree, and at rest every block is free."""
    rng = random.Random(7)
    sched = Scheduler(BlockManager(16, BLOCK, prefix_caching=True), 8, 4)
    prefixes = [[rng.randrange(3, 60) for _ in range(rng.randint(4, 14))] for _ in range(3)]
    pending = [
        make_seq(
            f"r{i}",
            rng.choice(prefixes) + [rng.randrange(3, 60) for _ in range(rng.randint(1, 6))],
            max_new_tokens=rng.randint(1, 6),
        )
        for i in range(60)
    ]
    aborted = 0
    for _ in range(2000):
        if not (pending or sched.has_work()):
            break
        while pending and rng.random() < 0.4:
            sched.add(pending.pop())
        if sched.running and rng.random() < 0.05:  # an abort, blocks possibly shared
            sched.finish(rng.choice(sched.running), "abort")
            aborted += 1
            sched.blocks.check_invariants(live(sched))
        step(sched, rng)
    assert not pending and not sched.has_work() and aborted > 0
    assert sched.num_preemptions > 0
    assert sched.blocks.num_free == sched.blocks.num_blocks
    assert sched.blocks.hit_tokens > 0


def test_identical_prompts_arriving_together_are_computed_once():
    """n > 1: the second copy waits for the first one's blocks instead of computing them."""
    sched = Scheduler(BlockManager(32, BLOCK, prefix_caching=True), 64, 8)
    prompt = list(range(10, 31))  # 21 tokens: 5 full blocks + 1
    copies = [make_seq(f"c{i}", prompt) for i in range(3)]
    for seq in copies:
        sched.add(seq)
    computed = 0
    while sched.has_work():
        out = sched.schedule()
        computed += sum(c.num_tokens for c in out.chunks if c.seq.num_generated == 0)
        sampled = sched.commit(out)
        for seq in sampled:
            seq.token_ids.append(5)
            if seq.num_generated >= seq.max_new_tokens:
                sched.finish(seq, "length")
        sched.blocks.check_invariants(live(sched))
    # The prompt once (21 tokens), then only each copy's last token.
    assert computed == 21 + 2
    assert [s.num_cached_tokens for s in copies] == [0, 20, 20]
    # each admission counted once, however many passes a copy waited
    assert (sched.blocks.query_tokens, sched.blocks.hit_tokens) == (3 * 21, 40)


def test_requests_behind_one_waiting_for_a_prefix_are_not_held_up():
    sched = Scheduler(BlockManager(64, BLOCK, prefix_caching=True), 20, 8)
    prompt = list(range(10, 41))  # 31 tokens: two passes of prefill (20 + 11)
    first, twin, other = make_seq("a", prompt), make_seq("b", prompt), make_seq("c", [5, 6, 7])
    sched.add(first)
    step(sched)  # a: 20 of 31
    sched.add(twin)
    sched.add(other)
    scheduled = step(sched)  # b waits for a's blocks; c, unrelated, goes ahead of it
    assert other in scheduled and twin not in scheduled
    while sched.has_work():
        step(sched)
    assert twin.num_cached_tokens == 28


def test_a_preempted_sequence_recomputes_from_the_cache():
    sched = Scheduler(BlockManager(7, BLOCK, prefix_caching=True), 16, 4)
    old = make_seq("old", range(10, 22), max_new_tokens=12)  # 12 + 12 tokens: 6 blocks
    young = make_seq("young", range(40, 48), max_new_tokens=12)
    sched.add(old)
    step(sched)
    sched.add(young)
    while young.num_preemptions == 0 and sched.has_work():
        step(sched)
    assert young.num_preemptions == 1 and young.status is SequenceStatus.WAITING
    counted = (sched.blocks.query_tokens, sched.blocks.hit_tokens)
    attach, found = sched.blocks.attach_prefix, []
    sched.blocks.attach_prefix = lambda seq: found.append((seq, attach(seq))) or found[-1][1]
    while sched.has_work():
        step(sched)
    assert any(seq is young and tokens > 0 for seq, tokens in found)  # found again
    # The lookups are counted once per sequence, as Response.cached_tokens and /metrics
    # count them: a recompute adds nothing (it was counted twice, with its generated
    # tokens too, so the engine's hit rate disagreed with /metrics).
    assert (sched.blocks.query_tokens, sched.blocks.hit_tokens) == counted


# ----- the engine ------------------------------------------------------------------

SYSTEM = "the quick brown fox jumps over the lazy dog while the cat sleeps "
SHARED = [SYSTEM + p for p in PROMPTS]
TIGHT = dict(token_budget=6, max_num_seqs=4, kv_block_size=4, num_kv_blocks=40)


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_tokens_equal_transformers_with_caching_on_and_off(checkpoints, tokenizer, name):
    """Shared prefixes and repeated prompts, split into 6-token passes in a small
    pool; the second round reads its prefixes from the cache."""
    path, hf_model = checkpoints(name)
    prompts = SHARED + PROMPTS[:2]
    expected = [hf_greedy(hf_model, tokenizer, p, 12) for p in prompts]
    for caching in (True, False):
        with mii.pipeline(str(path), enable_prefix_caching=caching, **TIGHT) as pipe:
            answered = []
            for _ in range(2):
                responses = pipe(prompts, do_sample=False, max_new_tokens=12)
                assert [r.token_ids for r in responses] == expected, caching
                answered += responses
            cached = [r.cached_tokens for r in responses]
            stats = pipe.engine.stats()
            assert stats["free_blocks"] == 40
        if caching:
            # the second round: every shared prompt's full blocks from the cache
            assert all(c >= 8 for c in cached[: len(SHARED)]), cached
            assert stats["prefix_cache_hits"] > 0
            # the engine's counters are the answers' own (preempted ones counted once)
            assert stats["prefix_cache_queries"] == sum(r.prompt_length for r in answered)
            assert stats["prefix_cache_hits"] == sum(r.cached_tokens for r in answered)
        else:
            assert cached == [0] * len(prompts) and stats["prefix_cache_hits"] == 0


def test_the_log_says_how_caching_meets_a_sliding_window(checkpoints, caplog):
    """Caching stays on for sliding-window models (tokens equal transformers' above),
    keeping whole sequences cached: the start-up log says so."""
    path, _ = checkpoints("mistral-window")
    with caplog.at_level("INFO", logger="mii.engine.bring_up"), mii.pipeline(str(path)):
        pass
    said = [r.getMessage() for r in caplog.records if "sliding window" in r.getMessage()]
    assert said and "of 8 tokens" in said[0] and "prefix caching is on" in said[0]


def test_the_warm_up_request_is_not_counted(llama, tmp_path, monkeypatch):
    """A deployment's replicas answer a tiny request before serving (``warm_up``):
    their stats then count the requests served only, as /metrics does."""
    monkeypatch.setenv("MII_CACHE_DIR", str(tmp_path))

    async def run():
        engine = mii.AsyncEngine(llama)
        try:
            await engine.warm_up()
            before = engine.stats()
            [answer] = await engine.generate([PROMPTS[0]], max_new_tokens=3, ignore_eos=True)
            return before, engine.stats(), answer
        finally:
            await engine.aclose()

    before, after, answer = asyncio.run(run())
    counted = ("prompt_tokens", "generation_tokens", "prefix_cache_queries", "prefix_cache_hits")
    assert [before[name] for name in counted] == [0, 0, 0, 0]
    assert after["prompt_tokens"] == after["prefix_cache_queries"] == answer.prompt_length
    assert after["generation_tokens"] == 3


def test_seeded_sampling_is_the_same_from_the_cache(llama, tmp_path, monkeypatch):
    monkeypatch.setenv("MII_CACHE_DIR", str(tmp_path))
    options = dict(max_new_tokens=10, temperature=1.3, seed=5, ignore_eos=True)
    answers = {}
    for caching in (False, True):
        with mii.pipeline(llama, enable_prefix_caching=caching, async_scheduling=True) as pipe:
            first = pipe(SHARED, **options)
            second = pipe(SHARED, **options)
        answers[caching] = [r.token_ids for r in first + second]
        assert [r.token_ids for r in first] == [r.token_ids for r in second]
    assert answers[True] == answers[False]
    assert all(r.cached_tokens > 0 for r in second)


def test_mixture_of_experts_with_caching(moe_checkpoints, tokenizer):  # noqa: F811
    path, hf_model = moe_checkpoints("mixtral")
    expected = [hf_greedy(hf_model, tokenizer, p, 8) for p in SHARED]
    with mii.pipeline(str(path), **TIGHT) as pipe:
        for _ in range(2):
            responses = pipe(SHARED, do_sample=False, max_new_tokens=8)
            assert [r.token_ids for r in responses] == expected
    assert all(r.cached_tokens > 0 for r in responses)


# ----- every surface -----------------------------------------------------------------


def test_the_flag_reaches_the_engine(tmp_path, monkeypatch):
    from mii.cli import build_parser
    from mii.cli.serve import serve_config

    monkeypatch.setenv("MII_CACHE_DIR", str(tmp_path))
    parse = build_parser().parse_args
    assert serve_config(parse(["serve", "m"])).engine_config().enable_prefix_caching is True
    off = serve_config(parse(["serve", "m", "--no-enable-prefix-caching"]))
    assert off.engine_config().enable_prefix_caching is False


def test_a_deployment_reports_cached_tokens(llama, tmp_path_factory, monkeypatch):
    """gRPC ``Response.cached_tokens``, OpenAI ``usage.prompt_tokens_details.cached_tokens``
    and the prefix cache metrics, on a real deployment."""
    import httpx
    import openai
    from prometheus_client.parser import text_string_to_metric_families

    from mii.rpc.deployment import free_port

    monkeypatch.setenv("MII_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    rest_port = free_port()
    client = mii.serve(llama, enable_restful_api=True, restful_api_port=rest_port, port=free_port())
    url = f"http://127.0.0.1:{rest_port}"
    try:
        first = client.generate(SHARED[0], max_new_tokens=2)[0]
        again = client.generate(SHARED[0], max_new_tokens=2)[0]
        assert first.cached_tokens == 0
        assert again.cached_tokens == (again.prompt_length - 1) // 16 * 16 > 0
        rest = httpx.post(
            f"{url}/mii/{client.deployment_name}",
            json={"prompts": SHARED[0], "max_new_tokens": 2},
            timeout=60,
        )
        assert rest.json()[0]["cached_tokens"] == again.cached_tokens  # the /mii route too
        oai = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        usage = oai.completions.create(model=None, prompt=SHARED[0], max_tokens=2).usage
        assert usage.prompt_tokens_details.cached_tokens == again.cached_tokens
        metrics = {
            s.name: s.value
            for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)
            for s in family.samples
        }
        assert metrics["mii_prefix_cache_queries_total"] == 4 * first.prompt_length
        assert metrics["mii_prefix_cache_hits_total"] == 3 * again.cached_tokens
        assert metrics["mii_prefix_cache_hit_rate"] == pytest.approx(
            3 * again.cached_tokens / (4 * first.prompt_length)
        )
        # The engine's counters (gRPC Stats) say the same: its warm-up request is not
        # counted, and a request asking for prompt logprobs (computed whole) is no
        # lookup on either side.
        client.generate(SHARED[1], max_new_tokens=2, prompt_logprobs=1)
        stats = client.stats()
        after = {
            s.name: s.value
            for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)
            for s in family.samples
        }
        counted = (4 * first.prompt_length, 3 * again.cached_tokens)
        assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == counted
        prefix = (after["mii_prefix_cache_queries_total"], after["mii_prefix_cache_hits_total"])
        assert prefix == counted
    finally:
        client.terminate_server()
