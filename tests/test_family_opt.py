"""OPT: greedy tokens from mii equal transformers' on tiny random checkpoints."""

from __future__ import annotations

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
from mii.models.opt import OPTForCausalLM

# name -> OPTConfig overrides; each exercises one layout found in published checkpoints.
VARIANTS = {
    "pre-ln": {},  # opt-125m, 1.3b, ...
    "post-ln-projected": {"do_layer_norm_before": False, "word_embed_proj_dim": 32},  # opt-350m
    "pre-ln-projected": {"word_embed_proj_dim": 48},
    "no-bias-no-affine": {
        "enable_bias": False,
        "layer_norm_elementwise_affine": False,
        "_remove_final_layer_norm": True,
        "activation_function": "gelu",
    },
}


def opt_config(tokenizer, **overrides):
    from transformers import OPTConfig

    return OPTConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        ffn_dim=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
        init_std=0.2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **overrides,
    )


@pytest.fixture(scope="module")
def opt_checkpoints(tmp_path_factory, tokenizer):
    """name -> (path, HF model), each built once per module."""
    return checkpoint_cache(
        tmp_path_factory,
        tokenizer,
        "opt",
        lambda name: opt_config(tokenizer, **VARIANTS[name]),
        vector_noise=1,
    )


@pytest.mark.parametrize("name", VARIANTS)
def test_matches_hf(opt_checkpoints, tokenizer, name):
    path, hf_model = opt_checkpoints(name)
    assert_matches_hf(path, hf_model, tokenizer)


@pytest.mark.parametrize("name", VARIANTS)
def test_matches_hf_with_chunking_and_preemption(opt_checkpoints, tokenizer, name):
    path, hf_model = opt_checkpoints(name)
    assert_matches_hf(
        path, hf_model, tokenizer, PROMPTS * 2, **TIGHT_OPTIONS, expect_preemption=True
    )


@pytest.mark.parametrize("name", VARIANTS)
def test_greedy_choices_are_not_near_ties(opt_checkpoints, tokenizer, name):
    _, hf_model = opt_checkpoints(name)
    assert_greedy_margins(hf_model, tokenizer)


def test_final_layer_norm_follows_hf(opt_checkpoints):
    """Only pre-LN checkpoints without _remove_final_layer_norm have one."""
    for name, want in [
        ("pre-ln", True),
        ("post-ln-projected", False),
        ("no-bias-no-affine", False),
    ]:
        path, hf_model = opt_checkpoints(name)
        model = OPTForCausalLM(read_hf_config(path))
        assert (model.model.decoder.final_layer_norm is not None) == want
        assert (hf_model.model.decoder.final_layer_norm is not None) == want


@pytest.mark.parametrize("name", ["pre-ln", "post-ln-projected", "no-bias-no-affine"])
@pytest.mark.parametrize("legacy_names", [False, True])
def test_every_hf_weight_is_consumed(opt_checkpoints, name, legacy_names):
    """Each checkpoint tensor lands in a parameter, every parameter is filled, and
    metaseq-converted names (``decoder.…`` without ``model.``) load the same way."""
    path, hf_model = opt_checkpoints(name)
    from safetensors.torch import load_file

    weights = load_file(path / "model.safetensors")
    assert "model.decoder.embed_positions.weight" in weights
    if legacy_names:
        weights = {k.removeprefix("model."): v for k, v in weights.items()}
        weights["lm_head.weight"] = hf_model.lm_head.weight  # old files ship the tied head
    model = OPTForCausalLM(read_hf_config(path))
    loaded = model.load_weights(weights.items())
    assert loaded == model.expected_weight_names()
    ours = dict(model.named_parameters())
    for hf_name, tensor in weights.items():
        if hf_name == "lm_head.weight":
            continue
        target, shard = model.map_weight_name(next(model.convert_weight(hf_name, tensor))[0])
        assert target in ours, hf_name
        if shard is None:
            assert torch.equal(ours[target], tensor), hf_name
    qkv = ours["model.decoder.layers.0.self_attn.qkv_proj.weight"]
    prefix = "decoder.layers.0.self_attn." if legacy_names else "model.decoder.layers.0.self_attn."
    expected = torch.cat([weights[f"{prefix}{p}_proj.weight"] for p in "qkv"])
    assert torch.equal(qkv, expected)
