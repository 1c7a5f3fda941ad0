"""Which weight quantization a model loads with: the engine's ``quantization``
option and the checkpoint's ``quantization_config`` (config.json).

Supported pre-quantized checkpoints hold float8 e4m3 weights with a
``weight_scale`` per tensor or per output channel:

- compressed-tensors (``quant_method: compressed-tensors``, ``format:
  float-quantized``), as llm-compressor's FP8 and FP8_DYNAMIC schemes write
  them. The config is read with the ``compressed-tensors`` library's own
  pydantic models (``pip install 'mii[quantized]'``). Static activation scales
  (``input_scale``, scheme FP8) are not used: activations are quantized per
  token at run time, as FP8_DYNAMIC asks.
- transformers' ``fbgemm_fp8`` (``FbgemmFp8Config``): per-channel scales
  [N, 1] float32. ``activation_scale_ub`` is not applied.

Anything else (int4/int8 schemes, block scales, GPTQ, AWQ, bitsandbytes, ...)
is refused with one error naming the scheme.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mii.errors import ModelLoadError
from mii.models.weight_quant import Fp8Mode

SUPPORTED = (
    "quantization='fp8' on a 16/32-bit checkpoint, or a pre-quantized FP8 checkpoint in the "
    "compressed-tensors (llm-compressor FP8 / FP8_DYNAMIC) or fbgemm_fp8 format"
)


@dataclass(frozen=True)
class WeightQuantization:
    """How the linear layers' weights are stored and where they come from."""

    mode: Fp8Mode  # None: not quantized
    source: str  # for messages and logs: "none", "fp8", "compressed-tensors", "fbgemm_fp8"
    # Checkpoint tensors read by nobody (static activation scales), by name suffix.
    skipped_suffixes: tuple[str, ...] = ()


def weight_quantization(hf_config: dict[str, Any], requested: str = "none") -> WeightQuantization:
    """The quantization of a model: the checkpoint's if it is pre-quantized (then
    ``requested`` must be "none" or "fp8"), else ``requested``."""
    config = hf_config.get("quantization_config")
    if config is None:
        if requested == "fp8":
            return WeightQuantization("online", "fp8")
        return WeightQuantization(None, "none")
    if not isinstance(config, dict):
        raise ModelLoadError("config.json's quantization_config is not a JSON object")
    method = config.get("quant_method")
    if method == "fbgemm_fp8":
        return WeightQuantization("checkpoint", "fbgemm_fp8", ("input_scale_ub",))
    if method == "compressed-tensors":
        _check_compressed_tensors(config)
        return WeightQuantization("checkpoint", "compressed-tensors", ("input_scale",))
    raise ModelLoadError(
        f"unsupported quantization scheme {_scheme_name(method, config)} (config.json's "
        f"quantization_config); supported: {SUPPORTED}"
    )


def _scheme_name(method: Any, config: dict[str, Any]) -> str:
    """The scheme as a user knows it: quant_method 'fp8' alone would read as the
    very option the message then names as supported."""
    if method != "fp8":
        return repr(method)
    activations = config.get("activation_scheme")
    detail = f", activation_scheme {activations!r}" if activations else ""
    block = config.get("weight_block_size")
    if block:
        return (
            f"quant_method 'fp8' with weight_block_size {block} (float8 weights with one "
            f"scale per block: transformers' FineGrainedFP8 format{detail})"
        )
    return (
        "quant_method 'fp8' without compressed-tensors (per-tensor float8 scales as "
        f"AutoFP8 writes them{detail})"
    )


def _check_compressed_tensors(config: dict[str, Any]) -> None:
    """Refuse every compressed-tensors checkpoint other than FP8 weights with
    per-tensor or per-channel scales, naming its scheme."""
    try:
        from compressed_tensors.quantization import QuantizationConfig
    except ImportError:
        raise ModelLoadError(
            "this checkpoint is quantized in the compressed-tensors format, which needs the "
            "compressed-tensors library: pip install 'mii[quantized]'"
        ) from None
    try:
        parsed = QuantizationConfig.model_validate(config)
    except Exception as err:  # pydantic's ValidationError, or the library's own checks
        raise ModelLoadError(f"invalid compressed-tensors quantization_config: {err}") from None
    problems = []
    fmt = str(getattr(parsed.format, "value", parsed.format))
    if fmt not in ("float-quantized", "None"):
        problems.append(f"format {fmt!r}")
    status = str(getattr(parsed.quantization_status, "value", parsed.quantization_status))
    if status != "compressed":
        problems.append(f"quantization_status {status!r} (float8 weights need 'compressed')")
    if parsed.kv_cache_scheme is not None:
        problems.append("a kv_cache_scheme (use kv_cache_dtype='fp8' instead)")
    sparsity = config.get("sparsity_config") or {}
    if isinstance(sparsity, dict) and sparsity.get("format", "dense") != "dense":
        # Compressed sparse tensors (bitmasks, ...) are not float8 weights.
        problems.append(f"sparsity format {sparsity['format']!r}")
    for name, scheme in parsed.config_groups.items():
        weights, inputs = scheme.weights, scheme.input_activations
        if weights is None:
            problems.append(f"group {name!r} has no weight scheme")
        elif not (
            weights.type == "float"
            and weights.num_bits == 8
            and str(getattr(weights.strategy, "value", weights.strategy)) in ("tensor", "channel")
        ):
            problems.append(f"group {name!r} weights {_describe(weights)}")
        if inputs is not None and not (inputs.type == "float" and inputs.num_bits == 8):
            problems.append(f"group {name!r} activations {_describe(inputs)}")
    if problems:
        raise ModelLoadError(
            "unsupported compressed-tensors quantization scheme: "
            + "; ".join(problems)
            + f". Supported: {SUPPORTED}"
        )


def _describe(args: Any) -> str:
    """E.g. ``int4 (group strategy, group_size 128)``: a scheme as its config reads."""
    strategy = getattr(args.strategy, "value", args.strategy)
    group = f", group_size {args.group_size}" if args.group_size else ""
    return f"{args.type}{args.num_bits} ({strategy} strategy{group})"


def missing_scales_hint(hf_config: dict[str, Any], missing: set[str]) -> str:
    """What to tell about a pre-quantized checkpoint that lacks only weight scales:
    most often its quantization_config leaves those layers in 16-bit (``ignore``,
    ``targets``), which is not supported; "" for any other missing weight."""
    config = hf_config.get("quantization_config")
    if not isinstance(config, dict) or not missing or not all("_scale" in n for n in missing):
        return ""
    said = []
    for key in ("ignore", "modules_to_not_convert"):  # compressed-tensors, fbgemm_fp8
        if config.get(key):
            said.append(f"{key} {config[key]}")
    for name, group in (config.get("config_groups") or {}).items():
        if isinstance(group, dict) and group.get("targets"):
            said.append(f"group {name!r} targets {group['targets']}")
    return (
        ". A pre-quantized checkpoint needs every linear layer of the decoder in float8 "
        "with its weight_scale (the LM head and MoE routers may stay 16-bit); layers that "
        "its quantization_config leaves in 16-bit"
        + (f" ({'; '.join(said)})" if said else "")
        + " are not supported yet: re-quantize it leaving only those in 16-bit, or load "
        "the 16-bit original with quantization='fp8'"
    )
