"""What the fused ops share: which implementation runs, the input checks, the dtypes the kernels take, the
torch path's backward, the allocation hook, the fusion op's level limit (its checks and its kernels both need it).

impl "auto" = the fused op on CUDA tensors, the plain torch reference elsewhere; "triton" = always the fused op
(a `torch.library` custom op: Triton on CUDA and under TRITON_INTERPRET=1, the reference on other devices, so
a model with `kernels: triton` runs and compiles anywhere); "torch" = the plain reference. Every public op
checks its inputs before it picks one, so each impl refuses a bad call with the same error.
"""
import os

import torch

IMPLS = ("auto", "triton", "torch")
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the Triton kernels load and store
MAX_LEVELS = 8  # fused_fusion_layernorm's levels: one kernel pointer per level (fusion_triton.py)
empty = torch.empty  # allocation hook for every buffer a kernel fills; tests swap in a NaN-filling one
# autograd's dispatch keys, which torch excludes while a custom op's body runs (see reference_vjp)
_AUTOGRAD_KEYS = (torch._C.DispatchKey.AutogradFunctionality, torch._C.DispatchKey.AutogradOther,
                  torch._C.DispatchKey.AutogradNestedTensor)


def resolve_impl(impl: str, *tensors) -> str:
    if impl not in IMPLS:
        raise ValueError(f"kernels impl: expected one of {IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    on_cuda = all(t.is_cuda for t in tensors)
    return "triton" if on_cuda and os.environ.get("MFF_DS_DISABLE_TRITON") != "1" else "torch"


def runs_triton(t: torch.Tensor) -> bool:
    """Inside a custom op: launch the Triton kernels (CUDA, or the interpreter on CPU) or run the reference."""
    return t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def check_dtype(name, t):
    if t.dtype not in KERNEL_DTYPES:
        raise TypeError(f"{name}: expected dtype in {KERNEL_DTYPES}, got {t.dtype}")


def check_devices(op, **tensors):
    """All of one call's tensors on one device (the kernels take one; torch's own error would differ by impl)."""
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"{op}: expected all inputs on one device, got " +
                         ", ".join(f"{name} on {d}" for name, d in devices.items()))


def reference_vjp(fn, primals, cotangent):
    """The torch path of a backward op: d(fn)/d(primals) transposed times cotangent, by autograd through the
    reference fn at the primals, detached. A custom op's body runs with autograd's dispatch keys excluded
    (enable_grad alone records nothing there), so this lifts that exclusion around fn; torch.func.vjp would not
    need it, but its wrapped tensors fail opcheck's schema test. The results are contiguous copies: an op's
    outputs may not alias one another, as autograd's can (stack's backward hands out views of one buffer),
    and the fake impls give contiguous ones."""
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in _AUTOGRAD_KEYS:
        exclude = exclude.remove(key)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude), torch.enable_grad():
        xs = [p.detach().requires_grad_() for p in primals]
        grads = torch.autograd.grad(fn(*xs), xs, cotangent, allow_unused=True, materialize_grads=True)
    return [g.clone(memory_format=torch.contiguous_format) for g in grads]


def block(n):
    """The block covering a row of n elements: the next power of 2 (Triton's tl.arange needs one)."""
    return 1 << max(0, n - 1).bit_length()


def rows_in_place(t):
    """A (B, N, C) tensor for a kernel that addresses row n of batch b at b*s0 + n*s1: itself when its last
    dim has unit stride (the model's slices and transposed views do not need a copy), else a contiguous copy;
    and those two strides."""
    t = t if t.stride(2) == 1 else t.contiguous()
    return t, t.stride(0), t.stride(1)


def row_tiles(rows):
    """Launch grid of a kernel with one program per tile of R rows (R chosen by the autotuner)."""
    return lambda meta: ((rows + meta["R"] - 1) // meta["R"],)


def row_programs(rows, device):
    """Programs for a kernel that walks blocks of rows and leaves one partial per program: 4 per SM on CUDA
    (enough to fill it, few partials to sum)."""
    if device.type == "cuda":
        return max(1, min(rows, 4 * torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(rows, 4))


def autotune(pairs, key):
    """triton.autotune over (rows per tile R, num_warps) pairs, keyed on the row width (`key`): on the GPU each
    pair is timed once per width. The interpreter cannot time kernels and runs the first pair, as does
    MFF_DS_AUTOTUNE=0 (the tests: their many small widths would each compile every pair); list one with R > 1
    first, so the tests cover partial row tiles. Every kernel here only writes its outputs (no accumulation into
    them), so timing runs repeat harmlessly. The choice is cached on disk (Triton's cache), so later processes
    (a resumed run, the next benchmark) do not time again."""
    import triton
    configs = [triton.Config({"R": r}, num_warps=w) for r, w in pairs]
    first_only = os.environ.get("TRITON_INTERPRET") == "1" or os.environ.get("MFF_DS_AUTOTUNE") == "0"
    return triton.autotune(configs[:1] if first_only else configs, key=key, cache_results=True)
