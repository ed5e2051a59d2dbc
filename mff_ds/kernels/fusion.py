"""Multi-level weighted fusion + LayerNorm: LN(sum_k softmax(logits)_k * levels[k]).

The fused version is the `torch.library` custom op mff_ds::fusion_layernorm (+ its backward op), taking the
softmax weights w (computed outside in torch, which also differentiates it); fusion_triton.py holds the
Triton kernels. Like them, the op computes in float32: on other devices it runs the reference on float32 copies
(its backward op differentiates that).
"""
import functools

import torch
import torch.nn.functional as F

from . import dispatch
from .dispatch import MAX_LEVELS


def _fuse_and_norm(levels, w, weight, bias, eps):
    """The reference after the softmax: w (K,) are the level weights."""
    fused = torch.stack(list(levels), dim=0).mul(w.view(-1, 1, 1, 1).to(levels[0].dtype)).sum(dim=0)
    return F.layer_norm(fused, fused.shape[-1:], weight, bias, eps)


def fused_fusion_layernorm_reference(levels, logits, weight, bias, eps=1e-6):
    return _fuse_and_norm(levels, torch.softmax(logits.reshape(-1), dim=0), weight, bias, eps)


def _op_reference(levels, w, weight, bias, eps):
    """What the op computes, by the reference (on other devices than the kernels')."""
    y = _fuse_and_norm([x.float() for x in levels], w.float(), weight.float(), bias.float(), eps)
    return y.to(levels[0].dtype)


def _check(levels, logits, weight, bias):
    K = len(levels)
    if not 1 <= K <= MAX_LEVELS:
        raise ValueError(f"fused_fusion_layernorm: expected 1 to {MAX_LEVELS} levels, got {K}")
    shape, device = levels[0].shape, levels[0].device
    for i, x in enumerate(levels):  # dtypes may differ: under autocast the projected levels are 16-bit, the last
        if x.shape != shape or x.device != device:  # (the residual stream) float32
            raise ValueError(f"fused_fusion_layernorm: level {i} is {tuple(x.shape)} on {x.device}, "
                             f"expected {tuple(shape)} on {device} like level 0")
        dispatch.check_dtype(f"fused_fusion_layernorm level {i}", x)
    C = shape[-1]
    if logits.numel() != K:
        raise ValueError(f"fused_fusion_layernorm: logits must have {K} entries (one per level), got {logits.numel()}")
    if weight is None or bias is None or tuple(weight.shape) != (C,) or tuple(bias.shape) != (C,):
        got = [None if t is None else tuple(t.shape) for t in (weight, bias)]
        raise ValueError(f"fused_fusion_layernorm: weight and bias must be ({C},) tensors, got {got[0]} and {got[1]}")
    dispatch.check_devices("fused_fusion_layernorm", levels=levels[0], logits=logits, weight=weight, bias=bias)


def _saved_rows(x):
    """Rows of the mean and rstd the op returns: the Triton backward reads them; the torch path's backward
    recomputes the reference instead, so there they are empty."""
    return x.numel() // x.shape[-1] if dispatch.runs_triton(x) else 0


@torch.library.custom_op("mff_ds::fusion_layernorm", mutates_args=())
def _fusion_op(levels: list[torch.Tensor], w: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
               eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> y (like levels[0]), mean and rstd per row (float32, saved for the backward; see _saved_rows)."""
    if dispatch.runs_triton(levels[0]):
        from .fusion_triton import fusion_layernorm_fwd
        return fusion_layernorm_fwd(levels, w, weight, bias, eps)
    y = _op_reference(levels, w, weight, bias, eps)
    return y, y.new_empty(0, dtype=torch.float32), y.new_empty(0, dtype=torch.float32)


@_fusion_op.register_fake
def _(levels, w, weight, bias, eps):
    x = levels[0]
    M = _saved_rows(x)
    return x.new_empty(x.shape), x.new_empty(M, dtype=torch.float32), x.new_empty(M, dtype=torch.float32)


@torch.library.custom_op("mff_ds::fusion_layernorm_backward", mutates_args=())
def _fusion_bwd_op(dy: torch.Tensor, levels: list[torch.Tensor], w: torch.Tensor, weight: torch.Tensor,
                   mean: torch.Tensor, rstd: torch.Tensor, eps: float) -> tuple[list[torch.Tensor], torch.Tensor]:
    """-> d(levels), [d(LN weight) (C) | d(LN bias) (C) | d(w) (K)] in float32 (one tensor: the kernel reduces
    them in one buffer, and an op's outputs may not be views of one another). The kernels read mean and rstd,
    the torch path eps."""
    if dispatch.runs_triton(dy):
        from .fusion_triton import fusion_layernorm_bwd
        return fusion_layernorm_bwd(dy, levels, w, weight, mean, rstd)
    # LayerNorm's bias gradient does not depend on the bias: differentiate at zeros
    grads = dispatch.reference_vjp(lambda w_, lnw, lnb, *xs: _op_reference(xs, w_, lnw, lnb, eps),
                                   [w, weight, torch.zeros_like(weight), *levels], dy)
    return grads[3:], torch.cat([g.float() for g in (grads[1], grads[2], grads[0])])


@_fusion_bwd_op.register_fake
def _(dy, levels, w, weight, mean, rstd, eps):
    return [x.new_empty(x.shape) for x in levels], dy.new_empty(2 * dy.shape[-1] + len(levels), dtype=torch.float32)


def _fusion_setup(ctx, inputs, output):
    levels, w, weight, bias, ctx.eps = inputs
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(w, weight, output[1], output[2], *levels)
    ctx.dtypes = weight.dtype, bias.dtype


def _fusion_backward(ctx, dy, _g_mean, _g_rstd):
    w, weight, mean, rstd, *levels = ctx.saved_tensors
    dxs, stats = _fusion_bwd_op(dy, levels, w, weight, mean, rstd, ctx.eps)
    C = dy.shape[-1]
    return list(dxs), stats[2 * C:], stats[:C].to(ctx.dtypes[0]), stats[C:2 * C].to(ctx.dtypes[1]), None


_fusion_op.register_autograd(_fusion_backward, setup_context=_fusion_setup)


def fused_fusion_layernorm(levels, logits, weight, bias, eps=1e-6, impl="auto"):
    """levels: K tensors (B,N,C); logits: K entries (any shape with K elements); weight/bias: (C,)."""
    levels = list(levels)
    _check(levels, logits, weight, bias)
    if dispatch.resolve_impl(impl, levels[0]) != "triton":
        return fused_fusion_layernorm_reference(levels, logits, weight, bias, eps)
    dtype = functools.reduce(torch.promote_types, [x.dtype for x in levels])  # as the reference's stack
    levels = [x.to(dtype) for x in levels]  # the kernel reads every level as one dtype
    w = torch.softmax(logits.reshape(-1).float(), dim=0)
    return _fusion_op(levels, w, weight, bias, float(eps))[0]
