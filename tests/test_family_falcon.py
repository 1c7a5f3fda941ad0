"""Falcon: every supported layout matches transformers, weights load by their HF names."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import mii
from helpers import PROMPTS, TIGHT_OPTIONS, assert_matches_hf, checkpoint_cache, hf_greedy
from mii.models.falcon import FalconForCausalLM
from mii.models.loader import _iterate_weights, build_model, read_hf_config
from mii.models.registry import model_class

# name -> FalconConfig overrides; each is one published layout.
LAYOUTS = {
    # Falcon-7B: multi-query, one shared norm, parallel attention + MLP, tied head.
    "7b-mqa": dict(multi_query=True, parallel_attn=True),
    # Falcon-40B/180B: grouped KV heads, ln_attn + ln_mlp, per-group fused qkv.
    "40b-grouped": dict(new_decoder_architecture=True, num_kv_heads=2),
    # Falcon2-11B: new architecture with one shared norm, untied head.
    "falcon2-one-norm": dict(
        new_decoder_architecture=True,
        num_kv_heads=2,
        num_ln_in_parallel_attn=1,
        tie_word_embeddings=False,
    ),
    # Old multi-head layout: per-head interleaved qkv, sequential block, biases, rope scaling.
    "mha-sequential": dict(
        multi_query=False,
        parallel_attn=False,
        bias=True,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0},
    ),
    # Multi-query with the sequential block and biases.
    "mqa-sequential-bias": dict(multi_query=True, parallel_attn=False, bias=True),
}


def falcon_config(tokenizer, **overrides):
    from transformers import FalconConfig

    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
        initializer_range=0.2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        alibi=False,
    )
    return FalconConfig(**{**common, **overrides})


@pytest.fixture(scope="module")
def falcon(tmp_path_factory, tokenizer):
    """name -> (checkpoint path, HF model), built once per module. Norms and biases are
    random too (transformers initialises them to 1 and 0, which would hide a swapped
    norm or a dropped bias)."""
    return checkpoint_cache(
        tmp_path_factory,
        tokenizer,
        "falcon",
        lambda name: falcon_config(tokenizer, **LAYOUTS[name]),
        seed=2,  # every greedy pick then wins by > 1e-3 (see the near-ties test)
        vector_noise=torch.default_generator,
    )


@pytest.mark.parametrize("name", LAYOUTS)
def test_matches_hf(falcon, tokenizer, name):
    path, hf_model = falcon(name)
    assert_matches_hf(path, hf_model, tokenizer)


@pytest.mark.parametrize("name", LAYOUTS)
def test_matches_hf_with_chunking_and_preemption(falcon, tokenizer, name):
    path, hf_model = falcon(name)
    assert_matches_hf(
        path, hf_model, tokenizer, PROMPTS * 2, expect_preemption=True, **TIGHT_OPTIONS
    )


@pytest.mark.parametrize("name", LAYOUTS)
def test_hf_weight_names_are_all_consumed(falcon, name):
    path, hf_model = falcon(name)
    model = build_model(read_hf_config(path), path, torch.float32, torch.device("cpu"))
    loaded = model.load_weights(_iterate_weights(path, "auto"))
    assert loaded == model.expected_weight_names()
    # Norms and embeddings keep the Hugging Face parameter names.
    ours = dict(model.named_parameters())
    for hf_name in hf_model.state_dict():
        if "norm" in hf_name or ".ln_" in hf_name or "word_embeddings" in hf_name:
            assert hf_name in ours, hf_name


def hf_fused_qkv_split(attention, fused: torch.Tensor):
    """q [T, H, hd], k and v [T, Hkv, hd] from HF's ``query_key_value`` output [T, ...],
    in transformers' layouts (its ``_split_heads`` up to 5.24, inline in
    ``FalconAttention.forward`` since 5.25): new architecture, per KV group its
    queries then its key and value; multi-query, all queries then one key and one
    value; otherwise query, key and value interleaved per head."""
    heads, hd = attention.num_heads, attention.head_dim
    if attention.new_decoder_architecture:
        grouped = fused.view(fused.shape[0], attention.num_kv_heads, -1, hd)
        return grouped[:, :, :-2].flatten(1, 2), grouped[:, :, -2], grouped[:, :, -1]
    if attention.multi_query:
        q, k, v = fused.view(fused.shape[0], heads + 2, hd).split([heads, 1, 1], dim=1)
        return q, k, v
    return fused.view(fused.shape[0], heads, 3, hd).unbind(2)


@pytest.mark.parametrize("name", LAYOUTS)
def test_qkv_split_matches_hf(falcon, name):
    """Our reordered qkv_proj gives exactly the q, k, v heads of HF's fused layout."""
    path, hf_model = falcon(name)
    model = build_model(read_hf_config(path), path, torch.float32, torch.device("cpu"))
    ours = model.transformer.h[1].self_attention
    theirs = hf_model.transformer.h[1].self_attention
    x = torch.randn(5, 64)
    with torch.no_grad():
        q_ref, k_ref, v_ref = hf_fused_qkv_split(theirs, theirs.query_key_value(x))
        q_size, kv_size = ours.num_heads * ours.head_dim, ours.num_kv_heads * ours.head_dim
        q, k, v = ours.qkv_proj(x).split([q_size, kv_size, kv_size], dim=-1)
    torch.testing.assert_close(q, q_ref.reshape(5, -1))
    torch.testing.assert_close(k, k_ref.reshape(5, -1))
    torch.testing.assert_close(v, v_ref.reshape(5, -1))


@pytest.mark.parametrize("name", LAYOUTS)
def test_logits_are_not_near_ties(falcon, tokenizer, name):
    """The greedy oracle is only meaningful if each greedy choice is robust to float
    reordering: check the top-2 margin wherever a token is picked."""
    _, hf_model = falcon(name)
    for prompt in PROMPTS:
        prompt_ids = tokenizer(prompt).input_ids
        ids = torch.tensor([prompt_ids + hf_greedy(hf_model, tokenizer, prompt, 24)])
        with torch.no_grad():
            logits = hf_model(ids).logits[0, len(prompt_ids) - 1 : -1]  # the picking positions
        top2 = logits.topk(2, dim=-1).values
        assert (top2[:, 0] - top2[:, 1]).min() > 1e-3, prompt


def test_legacy_config_keys(falcon, tokenizer, tmp_path):
    """RW-era key names (n_embed, n_head, n_layer, n_head_kv) read like the current ones."""
    path, hf_model = falcon("40b-grouped")
    shutil.copytree(path, tmp_path / "m")
    config_file = tmp_path / "m" / "config.json"
    config = json.loads(config_file.read_text())
    renames = {
        "hidden_size": "n_embed",
        "num_attention_heads": "n_head",
        "num_hidden_layers": "n_layer",
        "num_kv_heads": "n_head_kv",
    }
    for new, old in renames.items():
        config[old] = config.pop(new)
    config_file.write_text(json.dumps(config))
    model = FalconForCausalLM(config)
    assert (model.spec.hidden_size, model.spec.num_heads, model.spec.num_kv_heads) == (64, 4, 2)
    assert len(model.transformer.h) == 2
    with mii.pipeline(str(tmp_path / "m")) as pipe:
        [response] = pipe(PROMPTS[1], do_sample=False, max_new_tokens=12)
    assert response.token_ids == hf_greedy(hf_model, tokenizer, PROMPTS[1], 12)


def test_defaults_follow_falcon_config():
    """Missing keys take FalconConfig's defaults (the 7B shape, multi-query, tied head)."""
    from transformers import FalconConfig

    with torch.device("meta"):
        model = FalconForCausalLM({"model_type": "falcon", "num_hidden_layers": 1})
    hf = FalconConfig(num_hidden_layers=1)
    spec = model.spec
    assert (spec.hidden_size, spec.num_heads, spec.vocab_size) == (
        hf.hidden_size,
        hf.num_attention_heads,
        hf.vocab_size,
    )
    assert spec.ffn_hidden_size == hf.ffn_hidden_size
    assert spec.num_kv_heads == 1 and spec.qkv_layout == "mqa"
    assert spec.tie_word_embeddings and model.tied_embeddings
    assert spec.layer_norm_eps == hf.layer_norm_epsilon
    assert model.max_positions == hf.max_position_embeddings == 2048
    assert model.kv_spec == mii.models.base.KVCacheSpec(1, 1, hf.hidden_size // 71)


def test_alibi_is_refused(falcon, tmp_path):
    path, _ = falcon("7b-mqa")
    shutil.copytree(path, tmp_path / "m")
    config_file = tmp_path / "m" / "config.json"
    config = json.loads(config_file.read_text())
    config["alibi"] = True
    config_file.write_text(json.dumps(config))
    with pytest.raises(mii.UnsupportedModelError) as err:
        mii.pipeline(str(tmp_path / "m"))
    # It names the setting, why, and what to serve instead.
    for part in ("ALiBi Falcon variants are not supported", "alibi=true", "rotary", "alibi=false"):
        assert part in str(err.value)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"new_decoder_architecture": True, "parallel_attn": False}, "parallel_attn=false"),
        ({"num_ln_in_parallel_attn": 2}, "num_ln_in_parallel_attn=2"),
        ({"rope_parameters": {"rope_type": "proportional", "factor": 2.0}}, "proportional"),
        ({"activation": "mish"}, "mish"),
    ],
)
def test_unhonoured_features_are_refused(overrides, message):
    config = {"model_type": "falcon", "num_hidden_layers": 1, **overrides}
    with torch.device("meta"), pytest.raises(mii.UnsupportedModelError, match=message):
        FalconForCausalLM(config)


def test_registry_lists_falcon():
    assert model_class("falcon") is FalconForCausalLM
    with pytest.raises(mii.UnsupportedModelError, match=r"gpt_bigcode.*falcon.*llama"):
        model_class("gpt_bigcode")
