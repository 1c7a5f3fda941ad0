"""Compute kernels. Every op has a pure-torch reference here; faster (Triton)
versions must keep the same interface and are tested against the reference."""
