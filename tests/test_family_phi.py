"""Phi (1, 1.5, 2): greedy tokens from mii equal transformers' on tiny random checkpoints."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from helpers import (
    PROMPTS,
    TIGHT_OPTIONS,
    assert_greedy_margins,
    assert_matches_hf,
    checkpoint_cache,
)
from mii.models.loader import read_hf_config
from mii.models.phi import PhiForCausalLM

# name -> PhiConfig overrides. head_dim is 16, so the rotary dims are 8, 6 and 12.
VARIANTS = {
    "partial-0.5": {"partial_rotary_factor": 0.5},
    "qk-norm-gqa": {"qk_layernorm": True, "num_key_value_heads": 2, "partial_rotary_factor": 0.4},
    "tied-theta": {
        "tie_word_embeddings": True,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 1000.0,
            "partial_rotary_factor": 0.75,
        },
    },
}


def phi_config(tokenizer, **overrides):
    from transformers import PhiConfig

    return PhiConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
        initializer_range=0.2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **overrides,
    )


@pytest.fixture(scope="module")
def phi_checkpoints(tmp_path_factory, tokenizer):
    """name -> (path, HF model), each built once per module."""
    return checkpoint_cache(
        tmp_path_factory,
        tokenizer,
        "phi",
        lambda name: phi_config(tokenizer, **VARIANTS[name]),
        vector_noise=1,
    )


@pytest.mark.parametrize("name", VARIANTS)
def test_matches_hf(phi_checkpoints, tokenizer, name):
    path, hf_model = phi_checkpoints(name)
    assert_matches_hf(path, hf_model, tokenizer)


@pytest.mark.parametrize("name", VARIANTS)
def test_matches_hf_with_chunking_and_preemption(phi_checkpoints, tokenizer, name):
    path, hf_model = phi_checkpoints(name)
    assert_matches_hf(
        path, hf_model, tokenizer, PROMPTS * 2, **TIGHT_OPTIONS, expect_preemption=True
    )


@pytest.mark.parametrize("name", VARIANTS)
def test_greedy_choices_are_not_near_ties(phi_checkpoints, tokenizer, name):
    _, hf_model = phi_checkpoints(name)
    assert_greedy_margins(hf_model, tokenizer)


def test_transformers4_config_keys(phi_checkpoints, tokenizer, tmp_path):
    """Published Phi-2 configs keep partial_rotary_factor and rope_theta at the top
    level (no rope_parameters); they must mean the same."""
    path, hf_model = phi_checkpoints("tied-theta")
    shutil.copytree(path, tmp_path / "m")
    config_file = tmp_path / "m" / "config.json"
    config = json.loads(config_file.read_text())
    rope = config.pop("rope_parameters")
    config.update(
        rope_scaling=None, **{k: rope[k] for k in ("rope_theta", "partial_rotary_factor")}
    )
    config_file.write_text(json.dumps(config))
    spec = PhiForCausalLM(config).spec
    assert (spec.rotary_dim, spec.rope["rope_theta"]) == (12, 1000.0)
    assert_matches_hf(tmp_path / "m", hf_model, tokenizer, PROMPTS[:2])


@pytest.mark.parametrize("name", VARIANTS)
def test_every_hf_weight_is_consumed(phi_checkpoints, name):
    """Each checkpoint tensor lands in a parameter and every parameter is filled."""
    from safetensors.torch import load_file

    path, _ = phi_checkpoints(name)
    weights = load_file(path / "model.safetensors")
    model = PhiForCausalLM(read_hf_config(path))
    loaded = model.load_weights(weights.items())
    assert loaded == model.expected_weight_names()
    ours = dict(model.named_parameters())
    for hf_name, tensor in weights.items():
        target, shard = model.map_weight_name(hf_name)
        assert target in ours, hf_name
        if shard is None:
            assert torch.equal(ours[target], tensor), hf_name
    prefix = "model.layers.1.self_attn."
    qkv = ours[prefix + "qkv_proj.bias"]
    assert torch.equal(qkv, torch.cat([weights[f"{prefix}{p}_proj.bias"] for p in "qkv"]))
    assert "lm_head.bias" in weights
    assert ("lm_head.weight" in weights) != model.tied_embeddings
    if VARIANTS[name].get("qk_layernorm"):
        assert prefix + "q_layernorm.weight" in weights
