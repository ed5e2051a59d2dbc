"""Triton random masking (encoder) and unmasking (decoder), forward and backward.

Encoder: one argsort of the noise in torch; then one kernel pass gathers the kept tokens, adds their
positions, and scatters ids_restore and the mask (no second argsort). Backward gathers d(kept) back to
patch order (zeros at removed patches). Decoder: one pass puts kept tokens / the mask token back in patch
order and adds the decoder positions; backward scatters d(kept) and sums d(mask_token) per block of rows.
All arithmetic in float32; outputs in torch's promoted dtype, so results equal the reference bit for bit.
"""
import torch
import triton
import triton.language as tl

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_empty = torch.empty  # allocation hook for every buffer a kernel fills; tests swap in a NaN-filling one


def _settings(n):
    block = triton.next_power_of_2(n)
    return block, 4 if block <= 1024 else 8 if block <= 4096 else 16


def _check_dtype(name, t):
    if t.dtype not in _DTYPES:
        raise TypeError(f"{name}: expected dtype in {_DTYPES}, got {t.dtype}")


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


class RandomMasking(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tokens, pos_embed, noise, len_keep):
        B, L, C = tokens.shape
        tokens, pos_embed = tokens.contiguous(), pos_embed.contiguous()
        ids_shuffle = torch.argsort(noise, dim=1).contiguous()
        dtype = torch.result_type(tokens, pos_embed)
        kept = _empty(B, len_keep, C, device=tokens.device, dtype=dtype)
        mask = _empty(B, L, device=noise.device, dtype=noise.dtype)
        ids_restore = _empty(B, L, device=noise.device, dtype=torch.int64)
        block, warps = _settings(C)
        _mask_fwd_kernel[(B * L,)](tokens, pos_embed, ids_shuffle, kept, mask, ids_restore, L, C, len_keep,
                                   BLOCK=block, num_warps=warps)
        ids_keep = ids_shuffle[:, :len_keep]
        ctx.save_for_backward(ids_restore)
        ctx.meta = (B, L, C, len_keep, tokens.dtype, pos_embed.dtype, dtype)
        ctx.mark_non_differentiable(mask, ids_restore, ids_keep)
        return kept, mask, ids_restore, ids_keep

    @staticmethod
    def backward(ctx, g_kept, _g_mask, _g_restore, _g_keep):
        (ids_restore,) = ctx.saved_tensors
        B, L, C, len_keep, tok_dtype, pos_dtype, dtype = ctx.meta
        need_tok, need_pos = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if g_kept is None or not (need_tok or need_pos):
            return None, None, None, None
        g = _empty(B, L, C, device=g_kept.device, dtype=dtype)
        block, warps = _settings(C)
        _mask_bwd_kernel[(B * L,)](g_kept.to(dtype).contiguous(), ids_restore, g, L, C, len_keep,
                                   BLOCK=block, num_warps=warps)
        g_tok = g.to(tok_dtype) if need_tok else None
        g_pos = g.sum(0, keepdim=True).to(pos_dtype) if need_pos else None
        return g_tok, g_pos, None, None


class UnmaskTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kept, mask_token, ids_restore, pos_embed):
        B, len_keep, D = kept.shape
        L = ids_restore.shape[1]
        kept, pos_embed = kept.contiguous(), pos_embed.contiguous()
        ids_restore = ids_restore.contiguous()
        mt = mask_token.reshape(D).to(kept.dtype).contiguous()  # the reference casts mask_token to kept's dtype
        dtype = torch.result_type(kept, pos_embed)
        y = _empty(B, L, D, device=kept.device, dtype=dtype)
        block, warps = _settings(D)
        _unmask_fwd_kernel[(B * L,)](kept, mt, ids_restore, pos_embed, y, L, D, len_keep,
                                     BLOCK=block, num_warps=warps)
        ctx.save_for_backward(ids_restore)
        ctx.meta = (B, L, D, len_keep, kept.dtype, mask_token.dtype, mask_token.shape, pos_embed.dtype, dtype)
        return y

    @staticmethod
    def backward(ctx, g_out):
        (ids_restore,) = ctx.saved_tensors
        B, L, D, len_keep, kept_dtype, mt_dtype, mt_shape, pos_dtype, dtype = ctx.meta
        need_kept, need_mt, _, need_pos = ctx.needs_input_grad[:4]
        g_out = g_out.to(dtype).contiguous()
        g_kept = g_mt = g_pos = None
        if need_kept or need_mt:
            rows = 16
            chunks = triton.cdiv(L, rows)
            g_kept = _empty(B, len_keep, D, device=g_out.device, dtype=kept_dtype)
            part = _empty(B * chunks, D, device=g_out.device, dtype=torch.float32)
            block, warps = _settings(D)
            _unmask_bwd_kernel[(B, chunks)](g_out, ids_restore, g_kept, part, L, D, len_keep,
                                            ROWS=rows, BLOCK=block, num_warps=warps)
            # the reference sums d(mask_token) in kept's dtype after the cast; float32 here is at least as exact
            g_mt = part.sum(0).to(mt_dtype).reshape(mt_shape) if need_mt else None
            g_kept = g_kept if need_kept else None
        if need_pos:
            g_pos = g_out.sum(0, keepdim=True).to(pos_dtype)
        return g_kept, g_mt, None, g_pos


def random_masking_triton(tokens, pos_embed, noise, len_keep):
    """Same contract (and results, bit for bit) as masking.random_masking_reference."""
    if tokens.dim() != 3:
        raise ValueError(f"random_masking: tokens must be (B, L, C), got shape {tuple(tokens.shape)}")
    B, L, C = tokens.shape
    if tuple(pos_embed.shape) != (1, L, C):
        raise ValueError(f"random_masking: pos_embed must be (1, {L}, {C}), got {tuple(pos_embed.shape)}")
    if tuple(noise.shape) != (B, L):
        raise ValueError(f"random_masking: noise must be ({B}, {L}), got {tuple(noise.shape)}")
    if not 0 <= int(len_keep) <= L:
        raise ValueError(f"random_masking: len_keep must be in [0, {L}], got {len_keep}")
    _check_dtype("random_masking tokens", tokens)
    _check_dtype("random_masking pos_embed", pos_embed)
    if not noise.is_floating_point():
        raise TypeError(f"random_masking: noise must be floating point, got {noise.dtype}")
    return RandomMasking.apply(tokens, pos_embed, noise, int(len_keep))


def unmask_tokens_triton(kept, mask_token, ids_restore, pos_embed):
    """Same contract as masking.unmask_tokens_reference. ids_restore must be a permutation of range(L) per
    row (as random_masking returns it); it is not checked."""
    if kept.dim() != 3:
        raise ValueError(f"unmask_tokens: kept must be (B, len_keep, D), got shape {tuple(kept.shape)}")
    B, len_keep, D = kept.shape
    if ids_restore.dim() != 2 or ids_restore.shape[0] != B or ids_restore.shape[1] < len_keep:
        raise ValueError(f"unmask_tokens: ids_restore must be ({B}, L >= {len_keep}), got {tuple(ids_restore.shape)}")
    L = ids_restore.shape[1]
    if mask_token.numel() != D:
        raise ValueError(f"unmask_tokens: mask_token must be (1, 1, {D}), got {tuple(mask_token.shape)}")
    if tuple(pos_embed.shape) != (1, L, D):
        raise ValueError(f"unmask_tokens: pos_embed must be (1, {L}, {D}), got {tuple(pos_embed.shape)}")
    if ids_restore.dtype != torch.int64:
        raise TypeError(f"unmask_tokens: ids_restore must be int64, got {ids_restore.dtype}")
    for name, t in (("kept", kept), ("mask_token", mask_token), ("pos_embed", pos_embed)):
        _check_dtype(f"unmask_tokens {name}", t)
    return UnmaskTokens.apply(kept, mask_token, ids_restore, pos_embed)
