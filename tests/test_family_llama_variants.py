"""Families that reuse the Llama decoder: Qwen3, Gemma, Phi-3, and Qwen v1
checkpoints (converted from a tiny Qwen2 to the QWenLMHeadModel naming)."""

from __future__ import annotations

import json

import pytest
import torch

import mii
from helpers import (
    PROMPTS,
    TIGHT_OPTIONS,
    assert_matches_hf,
    hf_greedy,
    save_checkpoint,
    tiny_config_kwargs,
)


def build(tmp_path_factory, tokenizer, name, config):
    path = tmp_path_factory.mktemp(name)
    return path, save_checkpoint(path, config, tokenizer)


@pytest.fixture(scope="module")
def variants(tmp_path_factory, tokenizer):
    from transformers import GemmaConfig, Phi3Config, Qwen3Config

    return {
        "qwen3": build(
            tmp_path_factory,
            tokenizer,
            "qwen3",
            Qwen3Config(**tiny_config_kwargs(tokenizer, head_dim=32)),
        ),
        "gemma": build(
            tmp_path_factory,
            tokenizer,
            "gemma",
            GemmaConfig(
                **tiny_config_kwargs(
                    tokenizer, head_dim=32, num_key_value_heads=1, tie_word_embeddings=True
                )
            ),
        ),
        "phi3": build(
            tmp_path_factory,
            tokenizer,
            "phi3",
            Phi3Config(**tiny_config_kwargs(tokenizer, sliding_window=10)),
        ),
    }


@pytest.mark.parametrize("name", ["qwen3", "gemma", "phi3"])
def test_variant_matches_hf(variants, tokenizer, name):
    path, hf_model = variants[name]
    assert_matches_hf(path, hf_model, tokenizer)
    assert_matches_hf(
        path, hf_model, tokenizer, PROMPTS * 2, expect_preemption=True, **TIGHT_OPTIONS
    )


def test_phi3_checkpoint_has_fused_names(variants):
    from safetensors import safe_open

    path, _ = variants["phi3"]
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "model.layers.0.self_attn.qkv_proj.weight" in names
    assert "model.layers.0.mlp.gate_up_proj.weight" in names


# ----- Qwen v1 ------------------------------------------------------------------


def to_qwen_v1(qwen2_dir, target):
    """Rewrite a Qwen2 checkpoint (MHA, q/k/v biases) in the Qwen v1 layout."""
    from safetensors.torch import load_file, save_file

    src = load_file(qwen2_dir / "model.safetensors")
    cfg = json.loads((qwen2_dir / "config.json").read_text())
    out = {
        "transformer.wte.weight": src["model.embed_tokens.weight"],
        "transformer.ln_f.weight": src["model.norm.weight"],
        "lm_head.weight": src["lm_head.weight"],
    }
    for i in range(cfg["num_hidden_layers"]):
        a, b = f"model.layers.{i}.", f"transformer.h.{i}."
        attn = a + "self_attn."
        out[b + "ln_1.weight"] = src[a + "input_layernorm.weight"]
        out[b + "ln_2.weight"] = src[a + "post_attention_layernorm.weight"]
        for part in ("weight", "bias"):
            out[b + f"attn.c_attn.{part}"] = torch.cat(
                [src[attn + f"{p}_proj.{part}"] for p in "qkv"]
            )
        out[b + "attn.c_proj.weight"] = src[attn + "o_proj.weight"]
        out[b + "mlp.w1.weight"] = src[a + "mlp.up_proj.weight"]
        out[b + "mlp.w2.weight"] = src[a + "mlp.gate_proj.weight"]
        out[b + "mlp.c_proj.weight"] = src[a + "mlp.down_proj.weight"]
    target.mkdir()
    save_file(out, target / "model.safetensors", metadata={"format": "pt"})
    v1 = {
        "architectures": ["QWenLMHeadModel"],
        "model_type": "qwen",
        "auto_map": {"AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"},
        "vocab_size": cfg["vocab_size"],
        "hidden_size": cfg["hidden_size"],
        "intermediate_size": 2 * cfg["intermediate_size"],
        "num_hidden_layers": cfg["num_hidden_layers"],
        "num_attention_heads": cfg["num_attention_heads"],
        "kv_channels": cfg["hidden_size"] // cfg["num_attention_heads"],
        "layer_norm_epsilon": cfg["rms_norm_eps"],
        "rotary_emb_base": (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0),
        "rotary_pct": 1.0,
        "seq_length": cfg["max_position_embeddings"],
        "max_position_embeddings": cfg["max_position_embeddings"],
        "no_bias": True,
        "use_dynamic_ntk": True,
        "use_logn_attn": True,
        "eos_token_id": cfg["eos_token_id"],
    }
    (target / "config.json").write_text(json.dumps(v1))
    for f in qwen2_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            (target / f.name).write_bytes(f.read_bytes())
    return target


def test_qwen_v1_checkpoint_matches_the_original_qwen2(tmp_path, tokenizer):
    from transformers import Qwen2Config

    original = tmp_path / "qwen2"
    hf_model = save_checkpoint(
        original, Qwen2Config(**tiny_config_kwargs(tokenizer, num_key_value_heads=4)), tokenizer
    )
    v1 = to_qwen_v1(original, tmp_path / "qwen-v1")
    assert_matches_hf(v1, hf_model, tokenizer)
    assert_matches_hf(v1, hf_model, tokenizer, PROMPTS * 2, expect_preemption=True, **TIGHT_OPTIONS)


def test_qwen_v1_swapped_mlp_halves_matter(tmp_path, tokenizer):
    """Guard: loading w1 as the gate (the naive mapping) must change the output."""
    from transformers import Qwen2Config

    from mii.models.qwen import QWenLMHeadModel

    original = tmp_path / "qwen2"
    hf_model = save_checkpoint(
        original, Qwen2Config(**tiny_config_kwargs(tokenizer, num_key_value_heads=4)), tokenizer
    )
    v1 = to_qwen_v1(original, tmp_path / "qwen-v1")
    naive = tuple(
        (h, o, 1 - s) if h in (".mlp.w1.", ".mlp.w2.") else (h, o, s)
        for h, o, s in QWenLMHeadModel.weight_map
    )
    QWenLMHeadModel.weight_map, saved = naive, QWenLMHeadModel.weight_map
    try:
        with mii.pipeline(str(v1)) as pipe:
            [r] = pipe(PROMPTS[1], do_sample=False, max_new_tokens=12)
    finally:
        QWenLMHeadModel.weight_map = saved
    assert r.token_ids != hf_greedy(hf_model, tokenizer, PROMPTS[1], 12)
