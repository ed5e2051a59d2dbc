"""Pick the implementation of a fused op: "auto" = Triton on CUDA tensors, torch elsewhere."""
import os

IMPLS = ("auto", "triton", "torch")


def resolve_impl(impl: str, *tensors) -> str:
    if impl not in IMPLS:
        raise ValueError(f"kernels impl: expected one of {IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    on_cuda = all(t.is_cuda for t in tensors)
    return "triton" if on_cuda and os.environ.get("MFF_DS_DISABLE_TRITON") != "1" else "torch"
