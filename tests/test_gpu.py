"""End to end on a CUDA device (skipped without one): the Triton attention path
gives the same greedy tokens as transformers, across families and with chunked
prefill and preemption."""

from __future__ import annotations

import gc

import pytest
import torch

import mii
from helpers import PROMPTS, TIGHT_OPTIONS, hf_greedy
from test_family_mixtral import CHECKPOINTS as MOE_CHECKPOINTS
from test_family_mixtral import moe_checkpoints  # noqa: F401 (a fixture)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize(
    "name", ["llama", "llama-mha-tied", "llama3-rope", "mistral-window", "qwen2", "qwen2-window"]
)
@pytest.mark.parametrize("options", [{}, TIGHT_OPTIONS], ids=["default", "tight"])
def test_triton_path_matches_hf_on_gpu(checkpoints, tokenizer, name, options):
    path, hf_model = checkpoints(name)
    with mii.pipeline(str(path), device="cuda", dtype="float32", **options) as pipe:
        assert pipe.engine.core.device.type == "cuda"
        responses = pipe(PROMPTS * 2, do_sample=False, max_new_tokens=24)
    for prompt, response in zip(PROMPTS * 2, responses):
        assert response.token_ids == hf_greedy(hf_model, tokenizer, prompt, 24), prompt


def test_triton_and_torch_attention_agree_in_bf16(checkpoints, monkeypatch):
    path, _ = checkpoints("llama")
    outputs = {}
    for backend in ("triton", "torch"):
        monkeypatch.setenv("MII_ATTENTION", backend)
        with mii.pipeline(str(path), device="cuda", dtype="bfloat16") as pipe:
            outputs[backend] = pipe(PROMPTS, do_sample=False, max_new_tokens=16)
    agree = [
        a.token_ids[:4] == b.token_ids[:4] for a, b in zip(outputs["triton"], outputs["torch"])
    ]
    assert all(agree), "bf16 paths diverged within the first 4 tokens"


def test_fp8_kv_cache_triton_and_torch_agree(checkpoints, monkeypatch):
    """The fp8 cache through the Triton kernels (CUDA graphs on) and through the
    torch reference: the same quantised keys, so the same first tokens."""
    path, _ = checkpoints("llama")
    outputs = {}
    for backend in ("triton", "torch"):
        monkeypatch.setenv("MII_ATTENTION", backend)
        with mii.pipeline(str(path), device="cuda", dtype="bfloat16", kv_cache_dtype="fp8") as pipe:
            outputs[backend] = pipe(PROMPTS, do_sample=False, max_new_tokens=16)
    agree = [
        a.token_ids[:4] == b.token_ids[:4] for a, b in zip(outputs["triton"], outputs["torch"])
    ]
    assert all(agree), "fp8 paths diverged within the first 4 tokens"


def test_seeded_sampling_on_gpu(checkpoints):
    path, _ = checkpoints("llama")
    with mii.pipeline(str(path), device="cuda") as pipe:
        a = pipe(PROMPTS[0], max_new_tokens=16, seed=7, temperature=1.2)[0]
        b = pipe([PROMPTS[1], PROMPTS[0]], max_new_tokens=16, seed=7, temperature=1.2)[1]
    assert a.token_ids == b.token_ids


def test_cuda_graphs_replay_decode_and_match_eager(checkpoints):
    path, _ = checkpoints("llama")
    results = {}
    for graphs in (True, False):
        with mii.pipeline(str(path), device="cuda", dtype="float32", cuda_graphs=graphs) as pipe:
            results[graphs] = pipe(PROMPTS, do_sample=False, max_new_tokens=24)
            runner = pipe.engine.core.runner.graphs
            if graphs:
                assert runner is not None and runner.replays > 10
            else:
                assert runner is None
    for a, b in zip(results[True], results[False]):
        assert a.token_ids == b.token_ids


def test_torch_compile_matches_hf(checkpoints, tokenizer):
    path, hf_model = checkpoints("llama")
    with mii.pipeline(str(path), device="cuda", dtype="float32", compile=True) as pipe:
        assert pipe.engine.core.compile_s > 0
        responses = pipe(PROMPTS, do_sample=False, max_new_tokens=24)
    for prompt, response in zip(PROMPTS, responses):
        assert response.token_ids == hf_greedy(hf_model, tokenizer, prompt, 24), prompt


@pytest.mark.parametrize("name", list(MOE_CHECKPOINTS))
@pytest.mark.parametrize("options", [{}, TIGHT_OPTIONS], ids=["default", "tight"])
def test_moe_grouped_kernel_in_cuda_graphs_matches_hf(
    moe_checkpoints,  # noqa: F811
    tokenizer,
    name,
    options,
):
    path, hf_model = moe_checkpoints(name)
    with mii.pipeline(str(path), device="cuda", dtype="float32", **options) as pipe:
        responses = pipe(PROMPTS * 2, do_sample=False, max_new_tokens=24)
        graphs = pipe.engine.core.runner.graphs
        assert graphs is not None and graphs.replays > 0  # MoE decode ran in CUDA graphs
    for prompt, response in zip(PROMPTS * 2, responses):
        assert response.token_ids == hf_greedy(hf_model, tokenizer, prompt, 24), prompt


def test_async_and_sync_scheduling_agree_on_gpu(checkpoints):
    path, _ = checkpoints("llama")
    params = [
        dict(do_sample=False, max_new_tokens=24),
        dict(seed=11, temperature=0.9, max_new_tokens=24),
        dict(seed=5, max_new_tokens=20, stop=[" the"]),
    ]
    results = {}
    for async_scheduling in (False, True):
        options = dict(device="cuda", dtype="float32", async_scheduling=async_scheduling)
        with mii.pipeline(str(path), **options) as pipe:
            assert pipe.engine.core.async_scheduling is async_scheduling
            results[async_scheduling] = [
                [(r.token_ids, r.generated_text, r.finish_reason) for r in pipe(PROMPTS, **p)]
                for p in params
            ]
    assert results[True] == results[False]


def test_engine_freezes_its_startup_heap_until_released(checkpoints):
    """Full garbage collections skip the startup heap while the engine runs (a
    220 ms pause mid-W1 otherwise), and its objects are collectable after."""
    from mii.engine import heap

    path, _ = checkpoints("llama")
    holders = heap._engines  # engines another test left alive, if any
    # Objects frozen with no engine alive belong to someone else (a library or the
    # application): the engine must leave them frozen.
    frozen_by_others = holders == 0 and gc.get_freeze_count() > 0
    pipe = mii.pipeline(str(path), device="cuda")
    try:
        assert heap._engines == holders + 1 and gc.get_freeze_count() > 0
        assert pipe("Hello", max_new_tokens=4)[0].token_ids
    finally:
        pipe.destroy()
    assert heap._engines == holders
    still_frozen = gc.get_freeze_count() > 0
    assert still_frozen == (holders > 0 or frozen_by_others), (holders, frozen_by_others)


@pytest.mark.parametrize("compiled", [False, True], ids=["graphs", "graphs+compile"])
def test_destroy_gives_the_device_memory_back(checkpoints, compiled):
    """destroy() dropped the model but the runner's bound forward and captured CUDA
    graphs (and a torch.compile'd forward) still held it: the weights and the KV cache
    stayed allocated as long as the pipeline object lived. A GPU check of what
    tests/test_pipeline.py checks with weak references on the CPU."""
    path, _ = checkpoints("llama")
    gc.collect()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    pipe = mii.pipeline(str(path), device="cuda", compile=compiled)
    assert pipe("Hello", max_new_tokens=8)[0].token_ids
    assert pipe.engine.core.runner.graphs is not None  # decode passes were captured
    held = torch.cuda.memory_allocated() - before
    pipe.destroy()
    gc.collect()
    torch.cuda.synchronize()
    left = torch.cuda.memory_allocated() - before
    assert left < 0.05 * held, (held, left)  # the KV cache and weights went back


def test_logprobs_on_gpu_match_transformers(checkpoints, tokenizer):
    """On CUDA logprobs come back with the tokens through pinned memory, with async
    scheduling and decode passes replayed as CUDA graphs (fp32 weights)."""
    path, hf_model = checkpoints("llama")
    hf_model = hf_model.float()
    with mii.pipeline(str(path), device="cuda", dtype="float32", **TIGHT_OPTIONS) as pipe:
        assert pipe.engine.core.async_scheduling and pipe.engine.core.runner.graphs is not None
        responses = pipe(
            PROMPTS * 2, do_sample=False, max_new_tokens=12, logprobs=2, prompt_logprobs=1
        )
    for prompt, response in zip(PROMPTS * 2, responses):
        prompt_ids = tokenizer(prompt).input_ids
        ids = prompt_ids + response.token_ids
        with torch.no_grad():
            expected = hf_model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
        n = len(prompt_ids)
        assert response.prompt_logprobs[0] is None
        for j in range(1, len(ids)):
            entry = response.prompt_logprobs[j] if j < n else response.logprobs[j - n]
            assert entry.token_id == ids[j]
            assert abs(entry.logprob - expected[j - 1, ids[j]].item()) < 1e-3


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_prefix_caching_on_gpu_gives_the_same_tokens(checkpoints, kv_cache_dtype):
    """Cached prefixes read back through the Triton kernels, CUDA graphs and async
    scheduling (and the fp8 cache) give the tokens of an engine without caching."""
    path, _ = checkpoints("llama")
    system = "the quick brown fox jumps over the lazy dog while the cat sleeps "
    prompts = [system + p for p in PROMPTS]
    answers = {}
    for caching in (True, False):
        options = dict(enable_prefix_caching=caching, kv_cache_dtype=kv_cache_dtype)
        with mii.pipeline(str(path), device="cuda", dtype="float32", **options) as pipe:
            rounds = [pipe(prompts, do_sample=False, max_new_tokens=16) for _ in range(2)]
        answers[caching] = [[r.token_ids for r in batch] for batch in rounds]
        if caching:
            assert all(r.cached_tokens > 0 for r in rounds[1])
    assert answers[True] == answers[False]
