"""Triton fused multi-level fusion + LayerNorm: y = LN(sum_k w_k * levels[k]), forward and backward launchers of
the custom ops in fusion.py (w = softmax(logits) is computed outside, so its backward is torch's).

The K <= 8 levels are passed as separate pointers (unused slots point at level 0 and are masked off, so they
are never read); each level is read once per pass and no stacked (K, B, N, C) tensor exists. Both kernels work
on tiles of R rows (R and the warps autotuned per width C and K). Forward: float32 accumulation, saves mean and
rstd per row (8 bytes a row), so the backward needs no statistics pass. Backward: one launch of a fixed number of
programs (4 per SM), each walking its block of rows: recompute the fused row (the levels must be read anyway, for
d(w_k) = <d(fused), level_k>), write d(level_k) = w_k d(fused), and keep d(LN weight), d(LN bias) and the K dots
as per-column float32 accumulators, reduced across the row only once at the end (no reduction per row beyond
LayerNorm's two, no atomics). The per-program partials sit in one buffer and take one torch sum.
"""
import torch
import triton
import triton.language as tl

from . import dispatch
from .dispatch import MAX_LEVELS


@triton.jit
def _ld(ptr, off, m, ACTIVE: tl.constexpr):
    return tl.load(ptr + off, mask=m & ACTIVE, other=0.0).to(tl.float32)


@triton.jit
def _wk(w_ptr, k: tl.constexpr, K: tl.constexpr):
    """w[k] for an active level; slots k >= K read w[0] (in bounds) and multiply zeros."""
    return tl.load(w_ptr + k * (k < K))


@triton.jit
def _st(ptr, off, val, m, ACTIVE: tl.constexpr):
    tl.store(ptr + off, val.to(ptr.dtype.element_ty), mask=m & ACTIVE)


@dispatch.autotune([(2, 4), (1, 4), (1, 8), (4, 8)], key=["C", "K"])
@triton.jit
def _fusion_fwd_kernel(x0, x1, x2, x3, x4, x5, x6, x7, w_ptr, lnw_ptr, lnb_ptr, y_ptr, mean_ptr, rstd_ptr,
                       M, C, eps, K: tl.constexpr, BLOCK: tl.constexpr, R: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * R + tl.arange(0, R)
    cols = tl.arange(0, BLOCK)
    rm = rows < M
    cm = cols < C
    m = rm[:, None] & cm[None, :]
    off = rows[:, None] * C + cols[None, :]
    acc = _ld(x0, off, m, True) * _wk(w_ptr, 0, K)
    acc += _ld(x1, off, m, K > 1) * _wk(w_ptr, 1, K)
    acc += _ld(x2, off, m, K > 2) * _wk(w_ptr, 2, K)
    acc += _ld(x3, off, m, K > 3) * _wk(w_ptr, 3, K)
    acc += _ld(x4, off, m, K > 4) * _wk(w_ptr, 4, K)
    acc += _ld(x5, off, m, K > 5) * _wk(w_ptr, 5, K)
    acc += _ld(x6, off, m, K > 6) * _wk(w_ptr, 6, K)
    acc += _ld(x7, off, m, K > 7) * _wk(w_ptr, 7, K)
    mean = tl.sum(acc, axis=1) / C
    xc = tl.where(m, acc - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / C
    rstd = 1.0 / tl.sqrt(var + eps)
    lnw = tl.load(lnw_ptr + cols, mask=cm, other=0.0).to(tl.float32)
    lnb = tl.load(lnb_ptr + cols, mask=cm, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * lnw[None, :] + lnb[None, :]
    tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=m)
    tl.store(mean_ptr + rows, mean, mask=rm)
    tl.store(rstd_ptr + rows, rstd, mask=rm)


@dispatch.autotune([(2, 8), (1, 4), (1, 8), (2, 16)], key=["C", "K"])
@triton.jit
def _fusion_bwd_kernel(x0, x1, x2, x3, x4, x5, x6, x7, d0, d1, d2, d3, d4, d5, d6, d7,
                       w_ptr, lnw_ptr, dy_ptr, mean_ptr, rstd_ptr, part_ptr,
                       M, C, rows_per_prog, K: tl.constexpr, BLOCK: tl.constexpr, R: tl.constexpr):
    """part[program] = [d(LN weight) (C) | d(LN bias) (C) | d(w) (K)] over the program's rows."""
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    cm = cols < C
    lnw = tl.load(lnw_ptr + cols, mask=cm, other=0.0).to(tl.float32)
    w0 = _wk(w_ptr, 0, K)
    w1 = _wk(w_ptr, 1, K)
    w2 = _wk(w_ptr, 2, K)
    w3 = _wk(w_ptr, 3, K)
    w4 = _wk(w_ptr, 4, K)
    w5 = _wk(w_ptr, 5, K)
    w6 = _wk(w_ptr, 6, K)
    w7 = _wk(w_ptr, 7, K)
    dlnw = tl.zeros([BLOCK], dtype=tl.float32)
    dlnb = tl.zeros([BLOCK], dtype=tl.float32)
    s0 = tl.zeros([BLOCK], dtype=tl.float32)  # per-column partial dots <d(fused), level_k>
    s1 = tl.zeros([BLOCK], dtype=tl.float32)
    s2 = tl.zeros([BLOCK], dtype=tl.float32)
    s3 = tl.zeros([BLOCK], dtype=tl.float32)
    s4 = tl.zeros([BLOCK], dtype=tl.float32)
    s5 = tl.zeros([BLOCK], dtype=tl.float32)
    s6 = tl.zeros([BLOCK], dtype=tl.float32)
    s7 = tl.zeros([BLOCK], dtype=tl.float32)
    start = pid * rows_per_prog
    stop = tl.minimum(start + rows_per_prog, M)
    for t in range(0, rows_per_prog, R):
        rows = start + t + tl.arange(0, R)
        rm = rows < stop
        m = rm[:, None] & cm[None, :]
        off = rows[:, None] * C + cols[None, :]
        a0 = _ld(x0, off, m, True)
        a1 = _ld(x1, off, m, K > 1)
        a2 = _ld(x2, off, m, K > 2)
        a3 = _ld(x3, off, m, K > 3)
        a4 = _ld(x4, off, m, K > 4)
        a5 = _ld(x5, off, m, K > 5)
        a6 = _ld(x6, off, m, K > 6)
        a7 = _ld(x7, off, m, K > 7)
        acc = a0 * w0 + a1 * w1 + a2 * w2 + a3 * w3 + a4 * w4 + a5 * w5 + a6 * w6 + a7 * w7
        mean = tl.load(mean_ptr + rows, mask=rm, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=rm, other=0.0)
        xhat = tl.where(m, (acc - mean[:, None]) * rstd[:, None], 0.0)
        dy = tl.load(dy_ptr + off, mask=m, other=0.0).to(tl.float32)
        wdy = dy * lnw[None, :]
        c1 = tl.sum(xhat * wdy, axis=1) / C
        c2 = tl.sum(wdy, axis=1) / C
        g = tl.where(m, (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None], 0.0)
        dlnw += tl.sum(dy * xhat, axis=0)
        dlnb += tl.sum(dy, axis=0)
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
        _st(d0, off, g * w0, m, True)
        _st(d1, off, g * w1, m, K > 1)
        _st(d2, off, g * w2, m, K > 2)
        _st(d3, off, g * w3, m, K > 3)
        _st(d4, off, g * w4, m, K > 4)
        _st(d5, off, g * w5, m, K > 5)
        _st(d6, off, g * w6, m, K > 6)
        _st(d7, off, g * w7, m, K > 7)
    part = part_ptr + pid * (2 * C + K)
    tl.store(part + cols, dlnw, mask=cm)
    tl.store(part + C + cols, dlnb, mask=cm)
    dk = part + 2 * C
    tl.store(dk, tl.sum(s0, axis=0))
    if K > 1:
        tl.store(dk + 1, tl.sum(s1, axis=0))
    if K > 2:
        tl.store(dk + 2, tl.sum(s2, axis=0))
    if K > 3:
        tl.store(dk + 3, tl.sum(s3, axis=0))
    if K > 4:
        tl.store(dk + 4, tl.sum(s4, axis=0))
    if K > 5:
        tl.store(dk + 5, tl.sum(s5, axis=0))
    if K > 6:
        tl.store(dk + 6, tl.sum(s6, axis=0))
    if K > 7:
        tl.store(dk + 7, tl.sum(s7, axis=0))


def fusion_layernorm_fwd(levels, w, weight, bias, eps):
    """levels: K (B, N, C); w: (K,) float32 softmax weights -> y, mean and rstd per row (float32)."""
    K = len(levels)
    xs = [x.contiguous() for x in levels]
    shape, dev = xs[0].shape, xs[0].device
    C = shape[-1]
    M = xs[0].numel() // C
    y = dispatch.empty(shape, device=dev, dtype=xs[0].dtype)
    mean = dispatch.empty(M, device=dev, dtype=torch.float32)
    rstd = dispatch.empty(M, device=dev, dtype=torch.float32)
    _fusion_fwd_kernel[dispatch.row_tiles(M)](
        *xs, *[xs[0]] * (MAX_LEVELS - K), w.float().contiguous(), weight.contiguous(), bias.contiguous(), y, mean,
        rstd, M, C, eps, K=K, BLOCK=dispatch.block(C))
    return y, mean, rstd


def fusion_layernorm_bwd(dy, levels, w, weight, mean, rstd):
    """-> d(levels), [d(LN weight) (C) | d(LN bias) (C) | d(w) (K)] in float32."""
    K = len(levels)
    xs = [x.contiguous() for x in levels]
    dy = dy.contiguous()
    dev = dy.device
    M, C = mean.numel(), dy.shape[-1]
    dxs = [dispatch.empty(x.shape, device=dev, dtype=x.dtype) for x in xs]
    G = dispatch.row_programs(M, dev)
    rows = triton.cdiv(M, G)
    G = triton.cdiv(M, rows)
    part = dispatch.empty(G, 2 * C + K, device=dev, dtype=torch.float32)
    pad = MAX_LEVELS - K
    _fusion_bwd_kernel[(G,)](*xs, *[xs[0]] * pad, *dxs, *[dxs[0]] * pad, w.float().contiguous(), weight.contiguous(),
                             dy, mean, rstd, part, M, C, rows, K=K, BLOCK=dispatch.block(C))
    return dxs, part.sum(0)
