"""The long-context rope scalings (dynamic NTK, YaRN, LongRoPE) against transformers.

Every checkpoint's scaling threshold (``max_position_embeddings`` for dynamic
NTK, ``original_max_position_embeddings`` for the others) is 24 tokens, so the
test prompts (6 to 59 tokens, 24 generated) start below it and cross it while
generating, or start above it. mii runs them as one batch, again with a token
budget of 6 and a KV pool that forces chunked prefill and preemption (with and
without async scheduling), and one at a time; every answer must equal
transformers' greedy ``generate`` of that prompt alone.
"""

from __future__ import annotations

import pytest

import mii
from helpers import PROMPTS, TIGHT_OPTIONS, hf_greedy, save_checkpoint, tiny_config_kwargs

THRESHOLD = 24
NEW_TOKENS = 24
HEAD_DIM = 16  # tiny_config_kwargs: hidden 64 over 4 heads
LONGROPE = {
    "rope_type": "longrope",
    "rope_theta": 10000.0,
    "short_factor": [1.0, 1.0, 1.1, 1.2, 1.5, 2.0, 2.5, 3.0],
    "long_factor": [1.0, 1.5, 2.0, 3.0, 5.0, 8.0, 12.0, 16.0],
}
# name -> (transformers config class, config overrides)
SCALED = {
    "llama-dynamic": (
        "LlamaConfig",
        {
            "max_position_embeddings": THRESHOLD,
            "rope_parameters": {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0},
        },
    ),
    # Partial rotary (Phi-2: 8 of 16 channels), where the NTK exponent uses the rotary dim.
    "phi-dynamic": (
        "PhiConfig",
        {
            "max_position_embeddings": THRESHOLD,
            "rope_parameters": {
                "rope_type": "dynamic",
                "factor": 4.0,
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.5,
            },
        },
    ),
    "qwen2-yarn": (
        "Qwen2Config",
        {
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": THRESHOLD,
                "beta_fast": 8.0,
                "beta_slow": 1.0,
            }
        },
    ),
    "llama-longrope": (
        "LlamaConfig",
        {"rope_parameters": {**LONGROPE, "original_max_position_embeddings": THRESHOLD}},
    ),
    # Phi-3 128k style: the original length at the top level of config.json.
    "phi3-longrope": (
        "Phi3Config",
        {"rope_parameters": dict(LONGROPE), "original_max_position_embeddings": THRESHOLD},
    ),
}


@pytest.fixture(scope="module")
def scaled(tmp_path_factory, tokenizer):
    """name -> (path, HF model with the scaling, HF model with the same weights unscaled)."""
    import transformers

    cache: dict[str, tuple] = {}

    def get(name: str):
        if name not in cache:
            cls_name, overrides = SCALED[name]
            cls = getattr(transformers, cls_name)
            kwargs = tiny_config_kwargs(tokenizer, **overrides)
            path = tmp_path_factory.mktemp(name)
            model = save_checkpoint(path, cls(**kwargs), tokenizer)
            plain_kwargs = {**kwargs, "rope_parameters": {"rope_type": "default"}}
            plain_kwargs.pop("original_max_position_embeddings", None)
            plain = save_checkpoint(
                tmp_path_factory.mktemp(name + "-plain"), cls(**plain_kwargs), tokenizer
            )
            cache[name] = (path, model, plain)
        return cache[name]

    return get


def fresh_rope(hf_model) -> None:
    """Put transformers' rotary modules back in their state after loading.

    Dynamic NTK keeps the frequencies of the longest sequence it has seen between
    ``generate`` calls (until a call starts below ``max_position_embeddings``), so a
    request's answer would depend on the previous request; mii's answer is that of
    each request run alone on a freshly loaded model.
    """
    for module in hf_model.modules():
        if hasattr(module, "original_inv_freq"):
            module.inv_freq.copy_(module.original_inv_freq)
            module.max_seq_len_cached = module.original_max_seq_len


def expected_tokens(hf_model, tokenizer, prompts, new_tokens=NEW_TOKENS) -> list[list[int]]:
    out = []
    for prompt in prompts:
        fresh_rope(hf_model)
        out.append(hf_greedy(hf_model, tokenizer, prompt, new_tokens))
    return out


def test_prompts_cross_the_threshold(tokenizer):
    lengths = [len(tokenizer(p).input_ids) for p in PROMPTS]
    assert any(n < THRESHOLD < n + NEW_TOKENS for n in lengths)
    assert any(n > THRESHOLD for n in lengths)


@pytest.mark.parametrize("name", list(SCALED))
def test_scaling_matches_hf(scaled, tokenizer, name):
    path, hf_model, plain = scaled(name)
    expected = expected_tokens(hf_model, tokenizer, PROMPTS)
    # Guard: the scaling changes transformers' answer, so matching it proves it is honoured.
    assert expected != expected_tokens(plain, tokenizer, PROMPTS)
    for options in ({}, TIGHT_OPTIONS, {**TIGHT_OPTIONS, "async_scheduling": True}):
        with mii.pipeline(str(path), **options) as pipe:
            responses = pipe(PROMPTS, do_sample=False, max_new_tokens=NEW_TOKENS)
            if options:
                assert pipe.engine.stats()["preemptions"] > 0
        assert [r.token_ids for r in responses] == expected, options
    with mii.pipeline(str(path)) as pipe:  # alone: one request per pass
        for prompt, want in zip(PROMPTS, expected):
            [r] = pipe(prompt, do_sample=False, max_new_tokens=NEW_TOKENS)
            assert r.token_ids == want, prompt


def test_scaled_context_lengths(scaled, tokenizer):
    """The long-context scalings serve vLLM's lengths (dynamic NTK:
    max_position_embeddings * factor; YaRN: original * factor), and at least 2048."""
    from mii.models.rope import scaled_max_positions

    def limit(max_len, rope):
        return scaled_max_positions(max_len, {"original_max_position_embeddings": 4096, **rope})

    assert limit(4096, {"rope_type": "dynamic", "factor": 2.0}) == 8192
    assert limit(8192, {"rope_type": "yarn", "factor": 4.0}) == 4 * 4096
    assert limit(131072, {"rope_type": "longrope"}) == 131072
    assert limit(24, {"rope_type": "longrope"}) == 2048
    assert limit(24, {"rope_type": "linear", "factor": 2.0}) == 24  # unchanged types
    path, hf_model, _ = scaled("llama-dynamic")
    with mii.pipeline(str(path)) as pipe:
        assert pipe.engine.core.max_length == 2048
        # past max_position_embeddings * factor (96) too, as transformers
        prompt = PROMPTS[3] + " and leave the running batch at every forward step; "
        prompt += "nobody waits for a batch to drain."
        [r] = pipe(prompt, do_sample=False, max_new_tokens=16)
    assert r.prompt_length > THRESHOLD * 4
    assert [r.token_ids] == expected_tokens(hf_model, tokenizer, [prompt], 16)


@pytest.mark.parametrize("kind", ["dynamic", "yarn", "longrope"])
def test_fused_triton_path_reads_the_scaled_tables(kind):
    """The Triton rotary + KV write + attention path (interpreted on CPU) takes the
    table and rows ``RotaryEmbedding.table`` gives, with the reference's result: a
    long prompt's chunk, a short prompt's, and decodes on both sides of the threshold."""
    import random

    import torch

    from helpers import ragged_paged_batch
    from mii.models.rope import RotaryEmbedding, rope_parameters
    from mii.ops.attention import rotary_paged_attention_reference
    from mii.ops.triton_attention import paged_attention_triton

    _, overrides = {
        "dynamic": SCALED["llama-dynamic"],
        "yarn": SCALED["qwen2-yarn"],
        "longrope": SCALED["llama-longrope"],
    }[kind]
    config = {"max_position_embeddings": 256, **overrides}
    params = rope_parameters(config)
    rotary = RotaryEmbedding(HEAD_DIM, 128, params)
    rotary.reset_buffers()
    # (cached, new, prompt length) per sequence
    shapes = [(20, 12, 40), (0, 9, 9), (30, 1, 12), (10, 1, 10), (60, 1, 50)]
    positions = torch.tensor([p for c, n, _ in shapes for p in range(c, c + n)])
    rope_lens = torch.tensor([max(p + 1, plen) for c, n, plen in shapes for p in range(c, c + n)])
    cos_sin, rows = rotary.table(positions, rope_lens)
    block = 4
    num_blocks = sum((c + n + block - 1) // block for c, n, _ in shapes) + 2
    free = list(range(num_blocks))
    random.Random(0).shuffle(free)
    batch, _ = ragged_paged_batch([(c, n) for c, n, _ in shapes], block, free)
    gen = torch.Generator().manual_seed(0)
    tokens, heads, kv_heads = len(positions), 4, 2
    q = torch.randn(tokens, heads, HEAD_DIM, generator=gen)
    k = torch.randn(tokens, kv_heads, HEAD_DIM, generator=gen)
    v = torch.randn(tokens, kv_heads, HEAD_DIM, generator=gen)
    cache = torch.randn(num_blocks, block, kv_heads, HEAD_DIM, generator=gen)
    ref_k, ref_v = cache.clone(), cache.clone()
    expected = rotary_paged_attention_reference(
        q.clone(), k, v, rows, cos_sin, ref_k, ref_v, batch, HEAD_DIM**-0.5
    )
    kc, vc = cache.clone(), cache.clone()
    out = paged_attention_triton(q, k, v, rows, cos_sin, kc, vc, batch, HEAD_DIM**-0.5)
    torch.testing.assert_close(out, expected, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(kc, ref_k, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("name", ["llama-dynamic", "qwen2-yarn", "llama-longrope"])
def test_rotations_equal_transformers(tokenizer, name):
    """cos and sin of every position, for sequence lengths below, at and past the
    threshold, equal those of transformers' rotary module (its frequencies and
    attention factor) on a pass of that length."""
    import torch
    import transformers

    from mii.models.rope import RotaryEmbedding, rope_parameters

    cls_name, overrides = SCALED[name]
    config = getattr(transformers, cls_name)(**tiny_config_kwargs(tokenizer, **overrides))
    hf_rotary = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(config)
    params = rope_parameters(config.to_dict())
    rotary = RotaryEmbedding(HEAD_DIM, 96, params)
    rotary.reset_buffers()
    half = HEAD_DIM // 2
    for length in (10, THRESHOLD, THRESHOLD + 1, 40, 90):
        fresh_rope(hf_rotary)
        positions = torch.arange(length)
        cos, sin = hf_rotary(torch.zeros(1, dtype=torch.float32), positions[None])
        table, rows = rotary.table(positions, torch.full((length,), length))
        ours = table.index_select(0, rows)
        assert torch.equal(ours[:, :half], cos[0, :, :half]), length
        assert torch.equal(ours[:, half:], sin[0, :, :half]), length


def test_tensor_parallel_ranks_agree(scaled, tokenizer, tmp_path):
    """Two ranks (gloo, CPU) of the length-dependent scalings: every rank gets each
    token's rope length with the pass, and the tokens stay transformers'."""
    from test_tensor_parallel import run_torchrun

    names = ["llama-dynamic", "phi3-longrope"]
    jobs = [
        {
            "model": str(scaled(name)[0]),
            "prompts": PROMPTS,
            "new_tokens": NEW_TOKENS,
            "options": {"all_rank_output": False, **TIGHT_OPTIONS},
        }
        for name in names
    ]
    rank0 = run_torchrun(tmp_path, 2, jobs)[0]
    for name, got in zip(names, rank0):
        assert got["token_ids"] == expected_tokens(scaled(name)[1], tokenizer, PROMPTS), name


def test_layers_share_one_rope_table(scaled):
    """YaRN serves original * factor positions: the layers read one cos/sin table
    rather than one each."""
    from mii.models.rope import RotaryEmbedding

    path, _, _ = scaled("qwen2-yarn")
    with mii.pipeline(str(path)) as pipe:
        model = pipe.engine.core.model
        rotaries = [m for m in model.modules() if isinstance(m, RotaryEmbedding)]
        assert len(rotaries) == 2
        assert len({m.cos_sin.data_ptr() for m in rotaries}) == 1


def test_transformers4_rope_scaling_key(scaled, tokenizer, tmp_path):
    """Qwen2.5's published form: ``rope_scaling`` with ``type`` and a top-level
    ``rope_theta`` (Transformers 4 keys) gives the same model."""
    import json
    import shutil

    path, hf_model, _ = scaled("qwen2-yarn")
    shutil.copytree(path, tmp_path / "m")
    config_file = tmp_path / "m" / "config.json"
    config = json.loads(config_file.read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = {"type": rope.pop("rope_type"), **rope}
    config_file.write_text(json.dumps(config))
    with mii.pipeline(str(tmp_path / "m")) as pipe:
        responses = pipe(PROMPTS[:2], do_sample=False, max_new_tokens=NEW_TOKENS)
    assert [r.token_ids for r in responses] == expected_tokens(hf_model, tokenizer, PROMPTS[:2])


@pytest.mark.parametrize(
    ("rope", "missing"),
    [
        ({"rope_type": "dynamic"}, "'factor'"),
        ({"rope_type": "longrope", "short_factor": [1.0] * 8}, "'long_factor'"),
    ],
)
def test_incomplete_rope_settings_are_a_clear_error(tokenizer, rope, missing):
    import torch

    from mii.models.registry import model_class

    config = {"model_type": "llama", **tiny_config_kwargs(tokenizer), "rope_scaling": rope}
    with torch.device("meta"), pytest.raises(mii.UnsupportedModelError, match=missing):
        model_class("llama")(config)
