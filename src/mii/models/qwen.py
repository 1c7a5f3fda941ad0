"""Qwen (v1) checkpoints (``model_type: qwen``, ``QWenLMHeadModel`` weight names),
loaded without running the checkpoint's remote code.

The architecture is the Llama decoder with multi-head attention; only names and
a few config keys differ: packed ``c_attn`` (q, k, v with bias) and ``c_proj``
(no bias); the MLP computes ``c_proj(w1(x) * silu(w2(x)))``, so ``w2`` is the gate
and ``w1`` the up projection; ``intermediate_size`` counts both halves;
``kv_channels`` is the head size and ``rotary_emb_base`` the rope base.

Qwen v1's dynamic NTK scaling and log-n attention only act beyond
``seq_length``, so the model's maximum length is capped at ``seq_length``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from mii.models.llama import LlamaForCausalLM, LlamaSpec


class QWenLMHeadModel(LlamaForCausalLM):
    weight_map = (
        ("transformer.wte.", "model.embed_tokens.", None),
        ("transformer.h.", "model.layers.", None),
        ("transformer.ln_f.", "model.norm.", None),
        (".ln_1.", ".input_layernorm.", None),
        (".ln_2.", ".post_attention_layernorm.", None),
        (".attn.c_attn.", ".self_attn.qkv_proj.", "packed"),
        (".attn.c_proj.", ".self_attn.o_proj.", None),
        (".mlp.w2.", ".mlp.gate_up_proj.", 0),
        (".mlp.w1.", ".mlp.gate_up_proj.", 1),
        (".mlp.c_proj.", ".mlp.down_proj.", None),
    )

    @classmethod
    def spec_from_hf(cls, hf_config: dict[str, Any]) -> LlamaSpec:
        heads = hf_config["num_attention_heads"]
        hidden = hf_config["hidden_size"]
        head_dim = hf_config.get("kv_channels") or hidden // heads
        max_positions = hf_config.get("seq_length") or hf_config.get(
            "max_position_embeddings", 2048
        )
        as_llama = {
            "model_type": "qwen",
            "vocab_size": hf_config["vocab_size"],
            "hidden_size": hidden,
            "intermediate_size": hf_config["intermediate_size"] // 2,
            "num_hidden_layers": hf_config["num_hidden_layers"],
            "num_attention_heads": heads,
            "num_key_value_heads": heads,
            "head_dim": head_dim,
            "rms_norm_eps": hf_config.get("layer_norm_epsilon", 1e-6),
            "max_position_embeddings": max_positions,
            "rope_theta": hf_config.get("rotary_emb_base", 10000.0),
            "partial_rotary_factor": hf_config.get("rotary_pct", 1.0),
            "tie_word_embeddings": hf_config.get("tie_word_embeddings", False),
        }
        spec = LlamaSpec.from_hf(as_llama)
        return dataclasses.replace(spec, qkv_bias=True, o_bias=not hf_config.get("no_bias", True))
