"""Multi-level weighted fusion + LayerNorm: LN(sum_k softmax(logits)_k * levels[k]).

The fused version is the `torch.library` custom op mff_ds::fusion_layernorm (+ its backward op), taking the
softmax weights w (computed outside in torch, which also differentiates it); fusion_triton.py holds the
Triton kernels. Its torch formulas (other devices) compute in float32 like the kernels.
"""
import torch
import torch.nn.functional as F

from . import _dispatch as common

MAX_LEVELS = 8  # one kernel pointer per level (fusion_triton.py)


def fused_fusion_layernorm_reference(levels, logits, weight, bias, eps=1e-6):
    w = torch.softmax(logits.reshape(-1), dim=0)
    fused = torch.stack(list(levels), dim=0).mul(w.view(-1, 1, 1, 1).to(levels[0].dtype)).sum(dim=0)
    return F.layer_norm(fused, fused.shape[-1:], weight, bias, eps)


def _fused_rows(levels, w):
    """sum_k w_k levels[k] in float32, as (rows, C)."""
    acc = sum(x.float() * wk for x, wk in zip(levels, w.float()))
    return acc.reshape(-1, acc.shape[-1])


@torch.library.custom_op("mff_ds::fusion_layernorm", mutates_args=())
def _fusion_op(levels: list[torch.Tensor], w: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
               eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> y (like levels[0]), mean and rstd per row (float32, saved for the backward)."""
    if common.runs_triton(levels[0]):
        from .fusion_triton import fusion_layernorm_fwd
        return fusion_layernorm_fwd(levels, w, weight, bias, eps)
    acc = _fused_rows(levels, w)
    mean = acc.mean(-1)
    rstd = torch.rsqrt(acc.var(-1, correction=0) + eps)
    y = (acc - mean[:, None]) * rstd[:, None] * weight.float() + bias.float()
    return y.to(levels[0].dtype).reshape(levels[0].shape), mean, rstd


@_fusion_op.register_fake
def _(levels, w, weight, bias, eps):
    x = levels[0]
    M = x.numel() // x.shape[-1]
    return x.new_empty(x.shape), x.new_empty(M, dtype=torch.float32), x.new_empty(M, dtype=torch.float32)


@torch.library.custom_op("mff_ds::fusion_layernorm_backward", mutates_args=())
def _fusion_bwd_op(dy: torch.Tensor, levels: list[torch.Tensor], w: torch.Tensor, weight: torch.Tensor,
                   mean: torch.Tensor, rstd: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """-> d(levels), [d(LN weight) (C) | d(LN bias) (C) | d(w) (K)] in float32 (one tensor: the kernel reduces
    them in one buffer, and an op's outputs may not be views of one another)."""
    if common.runs_triton(dy):
        from .fusion_triton import fusion_layernorm_bwd
        return fusion_layernorm_bwd(dy, levels, w, weight, mean, rstd)
    xhat = (_fused_rows(levels, w) - mean[:, None]) * rstd[:, None]
    dy32 = dy.float().reshape(xhat.shape)
    wdy = dy32 * weight.float()
    g = (wdy - xhat * (xhat * wdy).mean(-1, keepdim=True) - wdy.mean(-1, keepdim=True)) * rstd[:, None]  # d(fused)
    dxs = [(g * wk).to(x.dtype).reshape(x.shape) for x, wk in zip(levels, w.float())]
    dw = torch.stack([(g * x.float().reshape(g.shape)).sum() for x in levels])
    return dxs, torch.cat([(dy32 * xhat).sum(0), dy32.sum(0), dw])


@_fusion_bwd_op.register_fake
def _(dy, levels, w, weight, mean, rstd):
    return [x.new_empty(x.shape) for x in levels], dy.new_empty(2 * dy.shape[-1] + len(levels), dtype=torch.float32)


def _fusion_setup(ctx, inputs, output):
    levels, w, weight, bias, _eps = inputs
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(w, weight, output[1], output[2], *levels)
    ctx.dtypes = weight.dtype, bias.dtype


def _fusion_backward(ctx, dy, _g_mean, _g_rstd):
    w, weight, mean, rstd, *levels = ctx.saved_tensors
    dxs, stats = _fusion_bwd_op(dy, levels, w, weight, mean, rstd)
    C = dy.shape[-1]
    return list(dxs), stats[2 * C:], stats[:C].to(ctx.dtypes[0]), stats[C:2 * C].to(ctx.dtypes[1]), None


_fusion_op.register_autograd(_fusion_backward, setup_context=_fusion_setup)


def fused_fusion_layernorm(levels, logits, weight, bias, eps=1e-6, impl="auto"):
    """levels: K tensors (B,N,C); logits: K entries (any shape with K elements); weight/bias: (C,)."""
    if common.resolve_impl(impl, levels[0]) != "triton":
        return fused_fusion_layernorm_reference(levels, logits, weight, bias, eps)
    levels = list(levels)
    K = len(levels)
    if not 1 <= K <= MAX_LEVELS:
        raise ValueError(f"fused_fusion_layernorm: expected 1 to {MAX_LEVELS} levels, got {K}")
    shape, dtype = levels[0].shape, levels[0].dtype
    for i, x in enumerate(levels):
        if x.shape != shape or x.dtype != dtype or x.device != levels[0].device:
            raise ValueError(f"fused_fusion_layernorm: level {i} is {tuple(x.shape)} {x.dtype} {x.device}, "
                             f"expected {tuple(shape)} {dtype} {levels[0].device} like level 0")
    common.check_dtype("fused_fusion_layernorm levels", levels[0])
    C = shape[-1]
    if logits.numel() != K:
        raise ValueError(f"fused_fusion_layernorm: logits must have {K} entries (one per level), got {logits.numel()}")
    if weight is None or bias is None or tuple(weight.shape) != (C,) or tuple(bias.shape) != (C,):
        raise ValueError(f"fused_fusion_layernorm: weight and bias must be ({C},) tensors, got "
                         f"{None if weight is None else tuple(weight.shape)} and {None if bias is None else tuple(bias.shape)}")
    w = torch.softmax(logits.reshape(-1).float(), dim=0)
    return _fusion_op(levels, w, weight, bias, float(eps))[0]
