"""GGUF files of tiny random Llama checkpoints, written with the ``gguf`` package's
writer as llama.cpp's converter lays them out (query/key rows permuted, norms in
F32, every matrix in the file's type)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Types the gguf package quantizes itself; K-quants it can only read (see _k_quant_blocks).
QUANTIZABLE = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")
K_QUANTS = ("Q4_K", "Q6_K")


def _permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's reordering of query / key rows (convert_hf_to_gguf.py)."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _gguf_name(hf_name: str) -> str:
    fixed = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf_name in fixed:
        return fixed[hf_name]
    parts = hf_name.split(".")  # model.layers.N.<module>.<proj>.weight
    layer, rest = parts[2], ".".join(parts[3:])
    blk = {
        "input_layernorm.weight": "attn_norm",
        "post_attention_layernorm.weight": "ffn_norm",
        "self_attn.q_proj.weight": "attn_q",
        "self_attn.k_proj.weight": "attn_k",
        "self_attn.v_proj.weight": "attn_v",
        "self_attn.o_proj.weight": "attn_output",
        "mlp.gate_proj.weight": "ffn_gate",
        "mlp.up_proj.weight": "ffn_up",
        "mlp.down_proj.weight": "ffn_down",
    }[rest]
    return f"blk.{layer}.{blk}.weight"


def _k_quant_blocks(qtype, shape: tuple[int, int], seed: int) -> np.ndarray:
    """Random but valid blocks of a K-quant type (gguf cannot quantize these): random
    bytes, with each block's float16 scale(s) set so that values have std about 0.2."""
    import gguf

    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = shape
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(rows * cols // block_size, type_size), dtype=np.uint8)
    # Scale field byte offsets: Q4_K starts with d, dmin; Q6_K ends with d.
    fields = [0, 2] if qtype.name == "Q4_K" else [type_size - 2]

    def set_scale(value: float) -> None:
        raw = np.frombuffer(np.float16(value).tobytes(), dtype=np.uint8)
        for offset in fields:
            blocks[:, offset : offset + 2] = raw

    set_scale(1.0)
    std = float(gguf.dequantize(blocks, qtype).std())
    set_scale(0.2 / std)
    return blocks.reshape(rows, cols // block_size * type_size)


def write_gguf(path: Path, hf_model, tokenizer_dir: Path, qtype_name: str, arch="llama") -> Path:
    """Write ``hf_model`` (a transformers Llama) and the tokenizer saved in
    ``tokenizer_dir`` as a GGUF file whose matrices are of type ``qtype_name``."""
    import gguf

    qtype = gguf.GGMLQuantizationType[qtype_name]
    config = hf_model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny-llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_vocab_size(config.vocab_size)
    _add_tokenizer(writer, tokenizer_dir, config)
    for index, (name, tensor) in enumerate(hf_model.state_dict().items()):
        data = tensor.detach().float().numpy()
        if name.endswith("q_proj.weight"):
            data = _permute(data, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            data = _permute(data, config.num_key_value_heads)
        if data.ndim == 1 or qtype_name == "F32":
            writer.add_tensor(_gguf_name(name), data.astype(np.float32))
        elif qtype_name in K_QUANTS:
            blocks = _k_quant_blocks(qtype, data.shape, seed=index)
            writer.add_tensor(_gguf_name(name), blocks, raw_dtype=qtype)
        else:
            writer.add_tensor(_gguf_name(name), gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add_tokenizer(writer, tokenizer_dir: Path, config) -> None:
    """The byte-level BPE of tests/helpers.make_tokenizer, as llama.cpp stores a gpt2 one."""
    spec = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    special = {t["content"] for t in spec["added_tokens"]}
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda item: item[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in special else 1 for t in tokens])  # 3: control
    writer.add_token_merges(merges)
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    writer.add_pad_token_id(config.pad_token_id)
    writer.add_add_bos_token(True)
    writer.add_chat_template(CHATML)
