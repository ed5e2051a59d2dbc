"""Triton random masking (encoder) and unmasking (decoder), forward and backward launchers of the custom ops
in masking.py.

Encoder: one argsort of the noise in torch; then one kernel pass gathers the kept tokens, adds their
positions, and scatters ids_restore and the mask (no second argsort). Backward gathers d(kept) back to
patch order (zeros at removed patches). Decoder: one pass puts kept tokens / the mask token back in patch
order and adds the decoder positions; backward scatters d(kept) and sums d(mask_token) per block of rows.
All arithmetic in float32; outputs in torch's promoted dtype, so results equal the reference bit for bit.
"""
import torch
import triton
import triton.language as tl

from . import _dispatch as common


@triton.jit
def _mask_fwd_kernel(tok_ptr, pos_ptr, shuffle_ptr, kept_ptr, mask_ptr, restore_ptr, L, C, len_keep,
                     BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # b * L + j, j = rank of the patch in the shuffle
    b = row // L
    j = row % L
    src = tl.load(shuffle_ptr + row)  # patch index of rank j
    tl.store(restore_ptr + b * L + src, j)
    tl.store(mask_ptr + b * L + src, (j >= len_keep).to(mask_ptr.dtype.element_ty))
    cols = tl.arange(0, BLOCK)
    m = (cols < C) & (j < len_keep)
    x = tl.load(tok_ptr + (b * L + src) * C + cols, mask=m, other=0.0).to(tl.float32)
    p = tl.load(pos_ptr + src * C + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(kept_ptr + (b * len_keep + j) * C + cols, (x + p).to(kept_ptr.dtype.element_ty), mask=m)


@triton.jit
def _mask_bwd_kernel(gkept_ptr, restore_ptr, gtok_ptr, L, C, len_keep, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # b * L + l
    b = row // L
    r = tl.load(restore_ptr + row)
    cols = tl.arange(0, BLOCK)
    m = cols < C
    g = tl.load(gkept_ptr + (b * len_keep + r) * C + cols, mask=m & (r < len_keep), other=0.0)
    tl.store(gtok_ptr + row * C + cols, g.to(gtok_ptr.dtype.element_ty), mask=m)


@triton.jit
def _unmask_fwd_kernel(kept_ptr, mt_ptr, restore_ptr, pos_ptr, out_ptr, L, D, len_keep, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # b * L + l
    b = row // L
    l = row % L
    r = tl.load(restore_ptr + row)
    cols = tl.arange(0, BLOCK)
    m = cols < D
    x = tl.load(kept_ptr + (b * len_keep + r) * D + cols, mask=m & (r < len_keep), other=0.0).to(tl.float32)
    t = tl.load(mt_ptr + cols, mask=m & (r >= len_keep), other=0.0).to(tl.float32)
    p = tl.load(pos_ptr + l * D + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * D + cols, ((x + t) + p).to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _unmask_bwd_kernel(gout_ptr, restore_ptr, gkept_ptr, gmt_part_ptr, L, D, len_keep,
                       ROWS: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    cols = tl.arange(0, BLOCK)
    m = cols < D
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(ROWS):
        l = chunk * ROWS + i
        valid = l < L
        row = b * L + l
        r = tl.load(restore_ptr + row, mask=valid, other=0)
        g = tl.load(gout_ptr + row * D + cols, mask=m & valid, other=0.0)
        tl.store(gkept_ptr + (b * len_keep + r) * D + cols, g.to(gkept_ptr.dtype.element_ty),
                 mask=m & valid & (r < len_keep))
        acc += tl.where(valid & (r >= len_keep), g.to(tl.float32), 0.0)
    tl.store(gmt_part_ptr + (b * tl.num_programs(1) + chunk) * D + cols, acc, mask=m)


def random_masking_fwd(tokens, pos_embed, noise, len_keep):
    B, L, C = tokens.shape
    tokens, pos_embed = tokens.contiguous(), pos_embed.contiguous()
    ids_shuffle = torch.argsort(noise, dim=1).contiguous()
    kept = common.empty(B, len_keep, C, device=tokens.device, dtype=torch.result_type(tokens, pos_embed))
    mask = common.empty(B, L, device=noise.device, dtype=noise.dtype)
    ids_restore = common.empty(B, L, device=noise.device, dtype=torch.int64)
    block, warps = common.block_warps(C)
    _mask_fwd_kernel[(B * L,)](tokens, pos_embed, ids_shuffle, kept, mask, ids_restore, L, C, len_keep,
                               BLOCK=block, num_warps=warps)
    return kept, mask, ids_restore, ids_shuffle


def random_masking_bwd(g_kept, ids_restore):
    """d(kept) (B, len_keep, C) -> d(tokens + positions) (B, L, C), zeros at removed patches."""
    B, len_keep, C = g_kept.shape
    L = ids_restore.shape[1]
    g = common.empty(B, L, C, device=g_kept.device, dtype=g_kept.dtype)
    block, warps = common.block_warps(C)
    _mask_bwd_kernel[(B * L,)](g_kept.contiguous(), ids_restore.contiguous(), g, L, C, len_keep,
                               BLOCK=block, num_warps=warps)
    return g


def unmask_tokens_fwd(kept, mask_token, ids_restore, pos_embed):
    B, len_keep, D = kept.shape
    L = ids_restore.shape[1]
    mt = mask_token.to(kept.dtype).contiguous()  # the reference casts mask_token to kept's dtype
    y = common.empty(B, L, D, device=kept.device, dtype=torch.result_type(kept, pos_embed))
    block, warps = common.block_warps(D)
    _unmask_fwd_kernel[(B * L,)](kept.contiguous(), mt, ids_restore.contiguous(), pos_embed.contiguous(), y,
                                 L, D, len_keep, BLOCK=block, num_warps=warps)
    return y


def unmask_tokens_bwd(g_out, ids_restore, len_keep, kept_dtype):
    """d(out) (B, L, D) -> d(kept) (B, len_keep, D) in kept_dtype, d(mask_token) (D,) in float32."""
    B, L, D = g_out.shape
    rows = 16
    chunks = triton.cdiv(L, rows)
    g_kept = common.empty(B, len_keep, D, device=g_out.device, dtype=kept_dtype)
    part = common.empty(B * chunks, D, device=g_out.device, dtype=torch.float32)
    block, warps = common.block_warps(D)
    _unmask_bwd_kernel[(B, chunks)](g_out.contiguous(), ids_restore.contiguous(), g_kept, part, L, D, len_keep,
                                    ROWS=rows, BLOCK=block, num_warps=warps)
    return g_kept, part.sum(0)
