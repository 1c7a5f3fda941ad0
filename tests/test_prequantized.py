"""Pre-quantized FP8 checkpoints (compressed-tensors as llm-compressor writes them,
transformers' fbgemm_fp8) load as their float8 weights and scales say, and
greedy decoding equals transformers on the dequantized weights; other schemes are
refused naming the scheme."""

from __future__ import annotations

import json

import pytest
import torch

import mii
from fp8_checkpoints import (
    FP8,
    compressed_tensors_config,
    dequantized_model,
    hand_dequantize,
    hand_quantize,
    write_prequantized,
)
from helpers import PROMPTS, hf_greedy
from mii.errors import ModelLoadError
from mii.models.loader import build_model, read_hf_config
from mii.models.moe import SparseMoE, map_expert_weight_name
from mii.ops.fp8_linear import dequantize_rows

# (format, per-tensor scales, llm-compressor FP8's static input_scale tensors)
FORMATS = {
    "compressed-tensors-fp8-dynamic": ("compressed-tensors", False, False),
    "compressed-tensors-fp8-static-per-tensor": ("compressed-tensors", True, True),
    "fbgemm_fp8": ("fbgemm_fp8", False, False),
}


@pytest.fixture(scope="module")
def prequantized(tmp_path_factory, tokenizer, checkpoints):
    """name -> (checkpoint dir, the transformers model it was quantized from)."""
    _, hf_model = checkpoints("qwen2")  # q/k/v biases: bias tensors stay 16-bit
    built = {}
    for name, (fmt, per_tensor, static) in FORMATS.items():
        path = tmp_path_factory.mktemp(name)
        write_prequantized(path, hf_model, tokenizer, fmt, per_tensor, static)
        built[name] = (path, hf_model)
    return built


@pytest.mark.parametrize("name", list(FORMATS))
def test_weights_load_as_dequantized_by_hand(prequantized, name, caplog):
    """Every float8 weight and its per-row scales equal the checkpoint's: q, k and v
    of one fused projection keep their own (per-tensor) scales. The load logs the format."""
    path, hf_model = prequantized[name]
    per_tensor = FORMATS[name][1]
    with caplog.at_level("INFO", logger="mii.models.loader"):
        model = build_model(read_hf_config(path), path, torch.float32, torch.device("cpu"))
    assert "pre-quantized checkpoint (" in caplog.text
    for i, layer in enumerate(model.model.layers):
        hf_layer = hf_model.model.layers[i]
        parts = {
            layer.self_attn.qkv_proj: [
                hf_layer.self_attn.q_proj,
                hf_layer.self_attn.k_proj,
                hf_layer.self_attn.v_proj,
            ],
            layer.self_attn.o_proj: [hf_layer.self_attn.o_proj],
            layer.mlp.gate_up_proj: [hf_layer.mlp.gate_proj, hf_layer.mlp.up_proj],
            layer.mlp.down_proj: [hf_layer.mlp.down_proj],
        }
        for ours, theirs in parts.items():
            assert ours.weight.dtype == FP8
            by_hand = torch.cat(
                [hand_dequantize(*hand_quantize(m.weight, per_tensor)) for m in theirs]
            )
            assert torch.equal(
                dequantize_rows(ours.weight, ours.weight_scale, torch.float32), by_hand
            )
        torch.testing.assert_close(
            layer.self_attn.qkv_proj.bias,
            torch.cat(
                [
                    hf_layer.self_attn.q_proj.bias,
                    hf_layer.self_attn.k_proj.bias,
                    hf_layer.self_attn.v_proj.bias,
                ]
            ),
            rtol=0,
            atol=0,
        )


@pytest.mark.parametrize("name", ["compressed-tensors-fp8-static-per-tensor", "fbgemm_fp8"])
def test_greedy_equals_transformers_on_the_dequantized_weights(prequantized, tokenizer, name):
    path, hf_model = prequantized[name]
    oracle = dequantized_model(hf_model, "tensor" if FORMATS[name][1] else "channel")
    # quantization="none" (the default): the checkpoint's own quantization applies.
    with mii.pipeline(str(path)) as pipe:
        responses = pipe(PROMPTS, do_sample=False, max_new_tokens=12)
    assert [r.token_ids for r in responses] == [
        hf_greedy(oracle, tokenizer, p, 12) for p in PROMPTS
    ]


@pytest.mark.parametrize(
    "deleted",
    ["model.layers.0.mlp.down_proj.weight_scale", "model.layers.1.mlp.up_proj.weight_scale"],
)
def test_missing_scales_are_named(tmp_path, prequantized, deleted):
    """By the checkpoint's own name, also where the tensor fills a part of one of
    our fused parameters (up_proj: the second half of gate_up_proj)."""
    from safetensors.torch import load_file, save_file

    path, _ = prequantized["fbgemm_fp8"]
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_bytes((path / "config.json").read_bytes())
    state = load_file(str(path / "model.safetensors"))
    del state[deleted]
    save_file(state, str(broken / "model.safetensors"))
    with pytest.raises(ModelLoadError) as info:
        build_model(read_hf_config(broken), broken, torch.float32, torch.device("cpu"))
    assert f"lacks weights for: {deleted}" in str(info.value)


def test_layers_the_config_leaves_in_16_bit_get_an_error_saying_why(
    tmp_path, prequantized, tokenizer
):
    """llm-compressor's ``ignore`` list keeps a layer's weight 16-bit, without a
    weight_scale: not supported, and the error says so (not only "lacks weights")."""
    from safetensors.torch import load_file, save_file

    path, hf_model = prequantized["compressed-tensors-fp8-dynamic"]
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"]["ignore"] = ["lm_head", "re:.*layers.1.mlp.down_proj$"]
    folder = tmp_path / "ignored"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    state = load_file(str(path / "model.safetensors"))
    name = "model.layers.1.mlp.down_proj.weight"
    state[name] = hf_model.state_dict()[name].clone()
    del state["model.layers.1.mlp.down_proj.weight_scale"]
    save_file(state, str(folder / "model.safetensors"))
    tokenizer.save_pretrained(folder)
    with pytest.raises(ModelLoadError) as info:
        mii.pipeline(str(folder))
    message = str(info.value)
    assert "model.layers.1.mlp.down_proj.weight_scale" in message
    assert "re:.*layers.1.mlp.down_proj$" in message and "not supported" in message
    assert "quantization='fp8'" in message


def _with_quantization_config(tmp_path, source, quantization_config) -> str:
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = quantization_config
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for item in source.iterdir():
        (folder / item.name).write_bytes(item.read_bytes())
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


@pytest.mark.parametrize(
    "quantization_config, named",
    [
        (compressed_tensors_config("W4A16"), r"int4 \(group strategy, group_size 128\)"),
        (compressed_tensors_config("W8A8"), r"int8 \(channel strategy\)"),
        ({"quant_method": "gptq", "bits": 4}, r"scheme 'gptq'"),
        (
            {"quant_method": "fp8", "weight_block_size": [128, 128]},
            r"quant_method 'fp8' with weight_block_size \[128, 128\] \(float8 weights with one "
            r"scale per block",
        ),
        (
            {"quant_method": "fp8", "activation_scheme": "static"},
            r"quant_method 'fp8' without compressed-tensors \(per-tensor float8 scales as "
            r"AutoFP8 writes them, activation_scheme 'static'\)",
        ),
        (
            {
                **compressed_tensors_config("FP8_DYNAMIC"),
                "sparsity_config": {"format": "sparse-24-bitmask", "targets": ["Linear"]},
            },
            r"sparsity format 'sparse-24-bitmask'",
        ),
    ],
    ids=["w4a16", "w8a8-int", "gptq", "block-fp8", "autofp8", "sparse-2of4-fp8"],
)
def test_unsupported_schemes_get_one_error_naming_them(
    tmp_path, prequantized, quantization_config, named
):
    path, _ = prequantized["fbgemm_fp8"]
    folder = _with_quantization_config(tmp_path, path, quantization_config)
    with pytest.raises(ModelLoadError, match=named) as info:
        mii.pipeline(folder)
    assert "Supported" in str(info.value) or "supported" in str(info.value)


def test_moe_expert_scales_load_per_expert():
    """Per-expert ``experts.{e}.w1.weight_scale`` tensors (llm-compressor's names)
    fill that expert's rows of ``w13_scale``; its float8 weight is copied as is."""
    from mii.models.weight_quant import fp8_weights

    assert map_expert_weight_name("m.experts.3.w1.weight_scale") == ("m.w13_scale", (3, "gate"))
    assert map_expert_weight_name("m.experts.1.down_proj.weight_scale") == (
        "m.w2_scale",
        (1, "down"),
    )
    with fp8_weights("checkpoint"):
        moe = SparseMoE(hidden_size=16, intermediate_size=8, num_experts=2, top_k=1)
    assert moe.weight_shards("w13_scale") == moe.weight_shards("w13")
    gate, up, down = torch.randn(8, 16), torch.randn(8, 16), torch.randn(16, 8)
    for part, name, w in (("gate", "w13", gate), ("up", "w13", up), ("down", "w2", down)):
        q, scale = hand_quantize(w)
        moe.weight_loader(name, getattr(moe, name), q, (1, part))
        moe.weight_loader(f"{name}_scale", getattr(moe, f"{name}_scale"), scale, (1, part))
    w13 = dequantize_rows(moe.w13[1], moe.w13_scale[1], torch.float32)
    assert torch.equal(
        w13, torch.cat([hand_dequantize(*hand_quantize(gate)), hand_dequantize(*hand_quantize(up))])
    )
    w2 = dequantize_rows(moe.w2[1], moe.w2_scale[1], torch.float32)
    assert torch.equal(w2, hand_dequantize(*hand_quantize(down)))
