"""Triton fused multi-level fusion + LayerNorm: y = LN(sum_k w_k * levels[k]), forward and backward launchers of
the custom ops in fusion.py (w = softmax(logits) is computed outside, so its backward is torch's).

The K <= 8 levels are passed as separate pointers (unused slots point at level 0 and are masked off, so they
are never read); each level is read once per pass and no stacked (K, B, N, C) tensor exists. Forward: one
program per row, float32 accumulation, saves mean and rstd per row. Backward: each program walks a block of
rows, recomputes the fused row, writes d(level_k) = w_k * d(fused) and accumulates d(LN weight), d(LN bias)
and the K dots <d(fused), level_k> = d(w_k) as float32 partials.
"""
import torch
import triton
import triton.language as tl

from . import _dispatch as common
from .fusion import MAX_LEVELS

MAX_K = tl.constexpr(MAX_LEVELS)


@triton.jit
def _ld(ptr, off, m, ACTIVE: tl.constexpr):
    return tl.load(ptr + off, mask=m & ACTIVE, other=0.0).to(tl.float32)


@triton.jit
def _fusion_fwd_kernel(x0, x1, x2, x3, x4, x5, x6, x7, w_ptr, lnw_ptr, lnb_ptr, y_ptr, mean_ptr, rstd_ptr,
                       C, eps, K: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    m = cols < C
    off = row * C + cols
    acc = _ld(x0, off, m, True) * tl.load(w_ptr)
    acc += _ld(x1, off, m, K > 1) * tl.load(w_ptr + 1)
    acc += _ld(x2, off, m, K > 2) * tl.load(w_ptr + 2)
    acc += _ld(x3, off, m, K > 3) * tl.load(w_ptr + 3)
    acc += _ld(x4, off, m, K > 4) * tl.load(w_ptr + 4)
    acc += _ld(x5, off, m, K > 5) * tl.load(w_ptr + 5)
    acc += _ld(x6, off, m, K > 6) * tl.load(w_ptr + 6)
    acc += _ld(x7, off, m, K > 7) * tl.load(w_ptr + 7)
    mean = tl.sum(acc, axis=0) / C
    xc = tl.where(m, acc - mean, 0.0)
    var = tl.sum(xc * xc, axis=0) / C
    rstd = 1.0 / tl.sqrt(var + eps)
    lnw = tl.load(lnw_ptr + cols, mask=m, other=0.0).to(tl.float32)
    lnb = tl.load(lnb_ptr + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(y_ptr + off, (xc * rstd * lnw + lnb).to(y_ptr.dtype.element_ty), mask=m)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _st(ptr, off, val, m, ACTIVE: tl.constexpr):
    tl.store(ptr + off, val.to(ptr.dtype.element_ty), mask=m & ACTIVE)


@triton.jit
def _fusion_bwd_kernel(x0, x1, x2, x3, x4, x5, x6, x7, d0, d1, d2, d3, d4, d5, d6, d7,
                       w_ptr, lnw_ptr, dy_ptr, mean_ptr, rstd_ptr, dlnw_ptr, dlnb_ptr, dw_ptr,
                       M, C, rows_per_prog, K: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    m = cols < C
    lnw = tl.load(lnw_ptr + cols, mask=m, other=0.0).to(tl.float32)
    w0 = tl.load(w_ptr)
    w1 = tl.load(w_ptr + 1)
    w2 = tl.load(w_ptr + 2)
    w3 = tl.load(w_ptr + 3)
    w4 = tl.load(w_ptr + 4)
    w5 = tl.load(w_ptr + 5)
    w6 = tl.load(w_ptr + 6)
    w7 = tl.load(w_ptr + 7)
    dlnw = tl.zeros([BLOCK], dtype=tl.float32)
    dlnb = tl.zeros([BLOCK], dtype=tl.float32)
    s0 = tl.zeros([1], dtype=tl.float32)  # running dots <d(fused), level_k>
    s1 = tl.zeros([1], dtype=tl.float32)
    s2 = tl.zeros([1], dtype=tl.float32)
    s3 = tl.zeros([1], dtype=tl.float32)
    s4 = tl.zeros([1], dtype=tl.float32)
    s5 = tl.zeros([1], dtype=tl.float32)
    s6 = tl.zeros([1], dtype=tl.float32)
    s7 = tl.zeros([1], dtype=tl.float32)
    start = pid.to(tl.int64) * rows_per_prog
    for i in range(rows_per_prog):
        row = start + i
        mm = m & (row < M)
        off = row * C + cols
        a0 = _ld(x0, off, mm, True)
        a1 = _ld(x1, off, mm, K > 1)
        a2 = _ld(x2, off, mm, K > 2)
        a3 = _ld(x3, off, mm, K > 3)
        a4 = _ld(x4, off, mm, K > 4)
        a5 = _ld(x5, off, mm, K > 5)
        a6 = _ld(x6, off, mm, K > 6)
        a7 = _ld(x7, off, mm, K > 7)
        acc = a0 * w0 + a1 * w1 + a2 * w2 + a3 * w3 + a4 * w4 + a5 * w5 + a6 * w6 + a7 * w7
        mean = tl.load(mean_ptr + row, mask=row < M, other=0.0)
        rstd = tl.load(rstd_ptr + row, mask=row < M, other=0.0)
        xhat = tl.where(mm, (acc - mean) * rstd, 0.0)
        dy = tl.load(dy_ptr + off, mask=mm, other=0.0).to(tl.float32)
        wdy = dy * lnw
        c1 = tl.sum(xhat * wdy, axis=0) / C
        c2 = tl.sum(wdy, axis=0) / C
        g = tl.where(mm, (wdy - (xhat * c1 + c2)) * rstd, 0.0)
        dlnw += dy * xhat
        dlnb += dy
        s0 += tl.sum(g * a0, axis=0)
        if K > 1:
            s1 += tl.sum(g * a1, axis=0)
        if K > 2:
            s2 += tl.sum(g * a2, axis=0)
        if K > 3:
            s3 += tl.sum(g * a3, axis=0)
        if K > 4:
            s4 += tl.sum(g * a4, axis=0)
        if K > 5:
            s5 += tl.sum(g * a5, axis=0)
        if K > 6:
            s6 += tl.sum(g * a6, axis=0)
        if K > 7:
            s7 += tl.sum(g * a7, axis=0)
        _st(d0, off, g * w0, mm, True)
        _st(d1, off, g * w1, mm, K > 1)
        _st(d2, off, g * w2, mm, K > 2)
        _st(d3, off, g * w3, mm, K > 3)
        _st(d4, off, g * w4, mm, K > 4)
        _st(d5, off, g * w5, mm, K > 5)
        _st(d6, off, g * w6, mm, K > 6)
        _st(d7, off, g * w7, mm, K > 7)
    pc = pid.to(tl.int64) * C + cols
    tl.store(dlnw_ptr + pc, dlnw, mask=m)
    tl.store(dlnb_ptr + pc, dlnb, mask=m)
    dk = dw_ptr + pid.to(tl.int64) * MAX_K
    tl.store(dk + 0, tl.sum(s0, axis=0))
    tl.store(dk + 1, tl.sum(s1, axis=0))
    tl.store(dk + 2, tl.sum(s2, axis=0))
    tl.store(dk + 3, tl.sum(s3, axis=0))
    tl.store(dk + 4, tl.sum(s4, axis=0))
    tl.store(dk + 5, tl.sum(s5, axis=0))
    tl.store(dk + 6, tl.sum(s6, axis=0))
    tl.store(dk + 7, tl.sum(s7, axis=0))


def _num_row_programs(M, device):
    if device.type == "cuda":
        return max(1, min(M, 4 * torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(M, 4))


def fusion_layernorm_fwd(levels, w, weight, bias, eps):
    """levels: K (B, N, C); w: (K,) float32 softmax weights -> y, mean and rstd per row (float32)."""
    K = len(levels)
    xs = [x.contiguous() for x in levels]
    shape, dev = xs[0].shape, xs[0].device
    C = shape[-1]
    M = xs[0].numel() // C
    y = common.empty(shape, device=dev, dtype=xs[0].dtype)
    mean = common.empty(M, device=dev, dtype=torch.float32)
    rstd = common.empty(M, device=dev, dtype=torch.float32)
    block, warps = common.block_warps(C)
    _fusion_fwd_kernel[(M,)](*xs, *[xs[0]] * (MAX_LEVELS - K), _padded(w), weight.contiguous(), bias.contiguous(),
                             y, mean, rstd, C, eps, K=K, BLOCK=block, num_warps=warps)
    return y, mean, rstd


def fusion_layernorm_bwd(dy, levels, w, weight, mean, rstd):
    """-> d(levels), d(w) (K,), d(LN weight), d(LN bias) (float32)."""
    K = len(levels)
    xs = [x.contiguous() for x in levels]
    dy = dy.contiguous()
    dev = dy.device
    M, C = mean.numel(), dy.shape[-1]
    dxs = [common.empty(x.shape, device=dev, dtype=x.dtype) for x in xs]
    G = _num_row_programs(M, dev)
    rows = triton.cdiv(M, G)
    G = triton.cdiv(M, rows)
    dlnw = common.empty(G, C, device=dev, dtype=torch.float32)
    dlnb = common.empty(G, C, device=dev, dtype=torch.float32)
    dw = common.empty(G, MAX_LEVELS, device=dev, dtype=torch.float32)
    block, warps = common.block_warps(C)
    warps = min(16, 2 * warps)  # K live rows per program: more warps keep registers per thread below ~180 (sm_90)
    pad = MAX_LEVELS - K
    _fusion_bwd_kernel[(G,)](*xs, *[xs[0]] * pad, *dxs, *[dxs[0]] * pad, _padded(w), weight.contiguous(), dy,
                             mean, rstd, dlnw, dlnb, dw, M, C, rows, K=K, BLOCK=block, num_warps=warps)
    return dxs, dw[:, :K].sum(0), dlnw.sum(0), dlnb.sum(0)


def _padded(w):
    return torch.nn.functional.pad(w.float(), (0, MAX_LEVELS - w.numel()))
