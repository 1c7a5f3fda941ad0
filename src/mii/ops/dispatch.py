"""Which implementation a layer runs: the Triton kernel or the torch code."""

from __future__ import annotations

import os

import torch

CHOICES = ("auto", "triton", "torch")

# Triton kernels run interpreted on the CPU (tests); read once, as Triton does
# when the kernels are defined.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_chosen(variable: str, device: torch.device) -> bool:
    """The choice in environment variable ``variable``: ``auto`` (the default)
    takes Triton on CUDA and torch elsewhere; ``triton`` forces the kernel (CPU
    tests run it interpreted); ``torch`` forces the torch code."""
    choice = os.environ.get(variable, "auto")
    if choice not in CHOICES:
        raise ValueError(f"{variable} must be 'auto', 'triton' or 'torch', not {choice!r}")
    if choice == "auto":
        return device.type == "cuda"
    return choice == "triton"
