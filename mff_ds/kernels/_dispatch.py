"""What the fused ops share: which implementation runs, the dtypes the kernels take, the allocation hook.

impl "auto" = the fused op on CUDA tensors, the plain torch reference elsewhere; "triton" = always the fused op
(a `torch.library` custom op: Triton on CUDA and under TRITON_INTERPRET=1, torch formulas on other devices, so
a model with `kernels: triton` runs and compiles anywhere); "torch" = the plain reference.
"""
import os

import torch

IMPLS = ("auto", "triton", "torch")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
empty = torch.empty  # allocation hook for every buffer a kernel fills; tests swap in a NaN-filling one


def resolve_impl(impl: str, *tensors) -> str:
    if impl not in IMPLS:
        raise ValueError(f"kernels impl: expected one of {IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    on_cuda = all(t.is_cuda for t in tensors)
    return "triton" if on_cuda and os.environ.get("MFF_DS_DISABLE_TRITON") != "1" else "torch"


def runs_triton(t: torch.Tensor) -> bool:
    """Inside a custom op: launch the Triton kernels (CUDA, or the interpreter on CPU) or use torch formulas."""
    return t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def check_dtype(name, t):
    if t.dtype not in DTYPES:
        raise TypeError(f"{name}: expected dtype in {DTYPES}, got {t.dtype}")


def block_warps(n):
    """One row of n elements per program: the block (next power of 2) and the warps for it."""
    block = 1 << max(0, n - 1).bit_length()
    return block, 4 if block <= 1024 else 8 if block <= 4096 else 16
