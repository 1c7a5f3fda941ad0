"""FP8 by hand, for the tests: quantizing a weight, the transformers oracle that
runs the dequantized weights, and pre-quantized checkpoints written as
llm-compressor (compressed-tensors) and transformers' fbgemm_fp8 write them."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

FP8 = torch.float8_e4m3fn


def hand_quantize(w: torch.Tensor, per_tensor: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """w: [..., K] -> (float8 w, float32 scales [..., 1], or [1] per tensor): amax / 448."""
    w = w.float()
    amax = w.abs().amax() if per_tensor else w.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / 448.0, torch.ones_like(amax))
    q = (w / scale).clamp(-448.0, 448.0).to(FP8)
    return q, scale.reshape(1) if per_tensor else scale


def hand_quantize_at_load(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w: [N, K] -> (float8 w, float32 scales [N, 1]) as quantization="fp8" does it:
    per row, of the 16 scales amax / 448 * 2^(i/16), the first whose rounding has
    the least squared error."""
    w = w.float()
    amax = w.abs().amax(dim=-1, keepdim=True)
    base = torch.where(amax > 0, amax / 448.0, torch.ones_like(amax))
    candidates = [base * 2.0 ** (i / 16) for i in range(16)]
    errors = torch.stack(
        [((w / s).to(FP8).float() * s - w).square().sum(dim=-1) for s in candidates]
    )
    best = errors.argmin(dim=0)  # the first of equal minima
    scale = torch.stack(candidates)[best, torch.arange(w.shape[0])]
    return (w / scale).to(FP8), scale


def hand_dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()


def quantized_names(state: dict[str, torch.Tensor]) -> list[str]:
    """The weights quantization covers: every 2-D and 3-D matrix but the embedding,
    the LM head and MoE routers (``...mlp.gate.weight``, ``shared_expert_gate``)."""
    skip = ("embed", "lm_head.", ".gate.weight", "shared_expert_gate.")
    return [n for n, t in state.items() if t.dim() >= 2 and not any(s in n for s in skip)]


def dequantized_model(hf_model, scales: str = "at_load"):
    """A copy of a transformers model whose quantized weights are replaced by their
    dequantized FP8 values: the oracle. ``scales``: "at_load" (quantization="fp8"'s
    searched per-channel scales), "channel" or "tensor" (amax / 448, as the
    pre-quantized checkpoints here are written)."""
    model = copy.deepcopy(hf_model)
    state = model.state_dict()
    with torch.no_grad():
        for name in quantized_names(state):
            w = state[name]
            if scales == "at_load":
                flat = w.reshape(-1, w.shape[-1])
                q, scale = hand_quantize_at_load(flat)
                w.copy_(hand_dequantize(q, scale).reshape(w.shape))
            else:
                w.copy_(hand_dequantize(*hand_quantize(w, scales == "tensor")))
    return model


def write_prequantized(
    path: Path, hf_model, tokenizer, fmt: str, per_tensor: bool = False, static_input: bool = False
) -> None:
    """Save ``hf_model`` quantized in format ``fmt`` ("compressed-tensors" or
    "fbgemm_fp8"): float8 ``*.weight`` and ``*.weight_scale`` ([N, 1] per channel,
    [1] per tensor); ``static_input`` adds llm-compressor FP8's ``input_scale``."""
    from safetensors.torch import save_file

    state = {k: v.detach().clone().contiguous() for k, v in hf_model.state_dict().items()}
    for name in quantized_names(state):
        q, scale = hand_quantize(state[name], per_tensor)
        state[name] = q
        state[name.removesuffix("weight") + "weight_scale"] = scale
        if static_input:
            state[name.removesuffix("weight") + "input_scale"] = torch.tensor([0.05])
    if hf_model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    path.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = hf_model.config.to_dict()
    config["quantization_config"] = quantization_config(fmt, per_tensor, static_input)
    (path / "config.json").write_text(json.dumps(config, default=str))
    tokenizer.save_pretrained(path)


def quantization_config(fmt: str, per_tensor: bool = False, static_input: bool = False) -> dict:
    """config.json's quantization_config as the tools write it."""
    if fmt == "fbgemm_fp8":
        from transformers import FbgemmFp8Config

        return json.loads(FbgemmFp8Config(modules_to_not_convert=["lm_head"]).to_json_string())
    if fmt == "compressed-tensors":
        return compressed_tensors_config(
            "FP8" if static_input else "FP8_DYNAMIC", per_tensor=per_tensor
        )
    raise ValueError(fmt)


def compressed_tensors_config(preset: str, per_tensor: bool = False, fmt: str = "") -> dict:
    """llm-compressor's ``quantization_config`` for a preset scheme ("FP8_DYNAMIC",
    "FP8", "W4A16", ...), built with compressed-tensors' own models."""
    from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme

    scheme = preset_name_to_scheme(preset, ["Linear"])
    if per_tensor and scheme.weights is not None:
        scheme.weights.strategy = "tensor"
    fmt = fmt or ("float-quantized" if scheme.weights.type == "float" else "pack-quantized")
    config = QuantizationConfig(
        config_groups={"group_0": scheme},
        format=fmt,
        quantization_status="compressed",
        ignore=["lm_head"],
    )
    return config.model_dump(mode="json")
