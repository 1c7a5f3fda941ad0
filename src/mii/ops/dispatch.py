"""Which implementation a layer runs: the Triton kernel or the torch code."""

from __future__ import annotations

import functools
import os

import torch

import mii.envs as envs

# Triton kernels run interpreted on the CPU (tests); read once, as Triton does
# when the kernels are defined. (Triton's own variable, not an MII switch.)
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_chosen(switch: envs.Switch[str], device: torch.device) -> bool:
    """The choice of a kernel switch (``envs.KERNEL_CHOICES``): ``auto`` (the
    default) takes Triton on CUDA and torch elsewhere; ``triton`` forces the kernel
    (CPU tests run it interpreted); ``torch`` forces the torch code."""
    choice = switch.get()
    if choice == "auto":
        return device.type == "cuda"
    if choice == "triton" and device.type == "cpu" and not INTERPRETED:
        # Else Triton fails deep inside the first forward pass ("0 active drivers").
        raise ValueError(
            f"{switch.name}=triton forces a Triton kernel, which needs a GPU; on the CPU it "
            f"runs only under Triton's interpreter (TRITON_INTERPRET=1, slow: for tests). "
            f"Unset {switch.name} (auto: the torch code on the CPU) or set it to 'torch'"
        )
    return choice == "triton"


def triton_attention_enabled(device: torch.device) -> bool:
    """Whether paged attention runs the Triton kernels (``ops.triton_attention``):
    on CUDA unless ``MII_ATTENTION=torch``; elsewhere always the torch reference."""
    return device.type == "cuda" and envs.ATTENTION.get() != "torch"


# Activations with a fused kernel (names as in ``models.layers.activation``) and
# their kernel code.
FUSED_ACTIVATIONS = {"silu": 0, "swish": 0, "gelu_pytorch_tanh": 1, "gelu_new": 1, "gelu_fast": 1}


def fused_kernels_enabled(device: torch.device) -> bool:
    """Whether the layers call the kernels of ``ops.fused_elementwise``: as
    ``MII_FUSED`` chooses, and never while torch.compile traces (it fuses the torch
    code itself). Defined here so that choosing imports no Triton."""
    return not torch.compiler.is_compiling() and triton_chosen(envs.FUSED, device)


# Most rows a linear layer sends to the skinny (decode) kernel of ``ops.triton_gemv``.
SKINNY_MAX_ROWS = 16


def _decode_sized(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """A call the skinny kernels read as it is: a decode-sized batch (at most
    SKINNY_MAX_ROWS rows) of 16/32-bit activations, rows and bias contiguous, int32
    offsets, and never while torch.compile traces (checked first: a shape test on a
    symbolic size would add a guard and a recompile)."""
    return (
        not torch.compiler.is_compiling()
        and x.dim() == 2
        and weight.dim() == 2
        and x.shape[0] <= SKINNY_MAX_ROWS
        and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
        and weight.device == x.device
        and x.stride(-1) == 1
        and weight.stride(-1) == 1
        and weight.numel() < 2**31
        and (bias is None or (bias.dtype == x.dtype and bias.is_contiguous()))
    )


def skinny_linear_enabled(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> bool:
    """Whether ``linear`` runs the skinny kernel for this call: a decode-sized call
    (``_decode_sized``) with a weight of the activations' dtype, on CUDA, as
    ``MII_GEMV`` chooses."""
    return (
        _decode_sized(x, weight, bias)
        and weight.dtype == x.dtype
        and triton_chosen(envs.GEMV, x.device)
    )


def fp8_triton_supported(device: torch.device) -> bool:
    """Whether Triton kernels read float8 e4m3 weights on ``device``: on NVIDIA GPUs
    of compute capability 8.9 or newer (Ada, Hopper: Triton converts e4m3 only
    there) unless ``MII_FP8_KERNELS=off``, or in the CPU interpreter (tests)."""
    if device.type != "cuda":
        return INTERPRETED
    if torch.version.hip is not None or envs.FP8_KERNELS.get() == "off":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _capability(index) >= (8, 9)


def skinny_fp8_linear_enabled(
    x: torch.Tensor, wq: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> bool:
    """Whether ``ops.fp8_linear`` runs the float8 skinny kernel of ``ops.triton_gemv``
    (``skinny_linear_fp8``) for this call: a decode-sized call (``_decode_sized``)
    with an e4m3 weight and a contiguous float32 scale per output channel, as
    ``MII_GEMV`` chooses, where Triton reads float8 (``fp8_triton_supported``).
    Larger batches go to ``torch._scaled_mm``."""
    return (
        _decode_sized(x, wq, bias)
        and wq.dtype == torch.float8_e4m3fn
        and scale.dtype == torch.float32
        and scale.shape == wq.shape[:1]
        and scale.is_contiguous()
        and triton_chosen(envs.GEMV, x.device)
        and fp8_triton_supported(x.device)
    )


def dependent_launch_enabled(device: torch.device) -> bool:
    """Whether the decode chain's Triton kernels use programmatic dependent launch
    (``ops.triton_pdl``): on NVIDIA Hopper or newer GPUs, compiled (not interpreted),
    unless ``MII_PDL=off``. Read at each launch; a captured CUDA graph keeps the
    choice made when it was captured."""
    if envs.PDL.get() == "off" or device.type != "cuda" or INTERPRETED:
        return False
    if torch.version.hip is not None:  # ROCm reports gfx versions as capabilities
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _capability(index) >= (9, 0)


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)
