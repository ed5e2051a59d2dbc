"""Triton random masking (encoder) and unmasking (decoder), forward and backward launchers of the custom ops
in masking.py.

Encoder: one argsort of the noise in torch; then one kernel pass gathers the kept tokens, adds their
positions, and scatters ids_restore and the mask (no second argsort). Backward gathers d(kept) back to
patch order (zeros at removed patches). Decoder: one pass puts kept tokens / the mask token back in patch
order and adds the decoder positions; backward scatters d(kept) and sums d(mask_token) per program over a
block of rows (a fixed number of programs, so few partials; no atomics). Every kernel works on tiles of R rows,
R and the warps autotuned per width. All arithmetic in float32; outputs in torch's promoted dtype, so results
equal the reference bit for bit.
"""
import torch
import triton
import triton.language as tl

from . import dispatch

_TILES = [(4, 4), (1, 4), (2, 8), (8, 8)]  # (rows per tile, warps); the first is the interpreter's


@dispatch.autotune(_TILES, key=["C"])
@triton.jit
def _mask_fwd_kernel(tok_ptr, pos_ptr, shuffle_ptr, kept_ptr, mask_ptr, restore_ptr, BL, L, C, len_keep,
                     tok_sb, tok_sl, tok_sc, BLOCK: tl.constexpr, R: tl.constexpr):
    row = tl.program_id(0).to(tl.int64) * R + tl.arange(0, R)  # b * L + j, j = rank of the patch in the shuffle
    rm = row < BL
    b = row // L
    j = row % L
    src = tl.load(shuffle_ptr + row, mask=rm, other=0)  # patch index of rank j
    tl.store(restore_ptr + b * L + src, j, mask=rm)
    tl.store(mask_ptr + b * L + src, (j >= len_keep).to(mask_ptr.dtype.element_ty), mask=rm)
    cols = tl.arange(0, BLOCK)
    m = (rm & (j < len_keep))[:, None] & (cols < C)[None, :]
    x = tl.load(tok_ptr + (b * tok_sb + src * tok_sl)[:, None] + cols[None, :] * tok_sc, mask=m, other=0.0)
    x = x.to(tl.float32)
    p = tl.load(pos_ptr + (src * C)[:, None] + cols[None, :], mask=m, other=0.0).to(tl.float32)
    tl.store(kept_ptr + ((b * len_keep + j) * C)[:, None] + cols[None, :], (x + p).to(kept_ptr.dtype.element_ty),
             mask=m)


@dispatch.autotune(_TILES, key=["C"])
@triton.jit
def _mask_bwd_kernel(gkept_ptr, restore_ptr, gtok_ptr, BL, L, C, len_keep, gk_sb, gk_sr,
                     BLOCK: tl.constexpr, R: tl.constexpr):
    row = tl.program_id(0).to(tl.int64) * R + tl.arange(0, R)  # b * L + l
    rm = row < BL
    b = row // L
    r = tl.load(restore_ptr + row, mask=rm, other=0)
    cols = tl.arange(0, BLOCK)
    cm = (cols < C)[None, :]
    g = tl.load(gkept_ptr + (b * gk_sb + r * gk_sr)[:, None] + cols[None, :],
                mask=(rm & (r < len_keep))[:, None] & cm, other=0.0)
    tl.store(gtok_ptr + (row * C)[:, None] + cols[None, :], g.to(gtok_ptr.dtype.element_ty), mask=rm[:, None] & cm)


@dispatch.autotune(_TILES, key=["D"])
@triton.jit
def _unmask_fwd_kernel(kept_ptr, mt_ptr, restore_ptr, pos_ptr, out_ptr, BL, L, D, len_keep, kept_sb, kept_sr,
                       BLOCK: tl.constexpr, R: tl.constexpr):
    row = tl.program_id(0).to(tl.int64) * R + tl.arange(0, R)  # b * L + l
    rm = row < BL
    b = row // L
    l = row % L
    r = tl.load(restore_ptr + row, mask=rm, other=0)
    cols = tl.arange(0, BLOCK)
    cm = (cols < D)[None, :]
    x = tl.load(kept_ptr + (b * kept_sb + r * kept_sr)[:, None] + cols[None, :],
                mask=(rm & (r < len_keep))[:, None] & cm, other=0.0).to(tl.float32)
    t = tl.load(mt_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
    t = tl.where((r >= len_keep)[:, None], t[None, :], 0.0)
    p = tl.load(pos_ptr + (l * D)[:, None] + cols[None, :], mask=rm[:, None] & cm, other=0.0).to(tl.float32)
    tl.store(out_ptr + (row * D)[:, None] + cols[None, :], ((x + t) + p).to(out_ptr.dtype.element_ty),
             mask=rm[:, None] & cm)


@dispatch.autotune(_TILES, key=["D"])
@triton.jit
def _unmask_bwd_kernel(gout_ptr, restore_ptr, gkept_ptr, gmt_part_ptr, BL, L, D, len_keep, rows_per_prog,
                       go_sb, go_sl, BLOCK: tl.constexpr, R: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    cm = (cols < D)[None, :]
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    start = pid * rows_per_prog
    stop = tl.minimum(start + rows_per_prog, BL)
    for t in range(0, rows_per_prog, R):
        row = start + t + tl.arange(0, R)  # b * L + l
        rm = row < stop
        b = row // L
        r = tl.load(restore_ptr + row, mask=rm, other=0)
        g = tl.load(gout_ptr + (b * go_sb + (row % L) * go_sl)[:, None] + cols[None, :], mask=rm[:, None] & cm,
                    other=0.0)
        tl.store(gkept_ptr + ((b * len_keep + r) * D)[:, None] + cols[None, :], g.to(gkept_ptr.dtype.element_ty),
                 mask=(rm & (r < len_keep))[:, None] & cm)
        acc += tl.sum(tl.where((rm & (r >= len_keep))[:, None], g.to(tl.float32), 0.0), axis=0)
    tl.store(gmt_part_ptr + pid * D + cols, acc, mask=cols < D)


def random_masking_fwd(tokens, pos_embed, noise, len_keep):
    B, L, C = tokens.shape
    ids_shuffle = torch.argsort(noise, dim=1).contiguous()
    kept = dispatch.empty(B, len_keep, C, device=tokens.device, dtype=torch.result_type(tokens, pos_embed))
    mask = dispatch.empty(B, L, device=noise.device, dtype=noise.dtype)
    ids_restore = dispatch.empty(B, L, device=noise.device, dtype=torch.int64)
    # tokens as they come (the model's are a transposed view of the patch-embed output): copying them to
    # contiguous would move all B*L rows twice to gather a quarter of them
    _mask_fwd_kernel[dispatch.row_tiles(B * L)](tokens, pos_embed.contiguous(), ids_shuffle, kept, mask, ids_restore,
                                   B * L, L, C, len_keep, *tokens.stride(), BLOCK=dispatch.block(C))
    return kept, mask, ids_restore, ids_shuffle


def random_masking_bwd(g_kept, ids_restore):
    """d(kept) (B, len_keep, C) -> d(tokens + positions) (B, L, C), zeros at removed patches."""
    B, len_keep, C = g_kept.shape
    L = ids_restore.shape[1]
    g = dispatch.empty(B, L, C, device=g_kept.device, dtype=g_kept.dtype)
    g_kept, sb, sr = dispatch.rows_in_place(g_kept)  # in the model a slice of the [cls, kept] grad: no copy
    _mask_bwd_kernel[dispatch.row_tiles(B * L)](g_kept, ids_restore.contiguous(), g, B * L, L, C, len_keep, sb, sr,
                                   BLOCK=dispatch.block(C))
    return g


def unmask_tokens_fwd(kept, mask_token, ids_restore, pos_embed):
    B, len_keep, D = kept.shape
    L = ids_restore.shape[1]
    mt = mask_token.to(kept.dtype).contiguous()  # the reference casts mask_token to kept's dtype
    y = dispatch.empty(B, L, D, device=kept.device, dtype=torch.result_type(kept, pos_embed))
    kept, sb, sr = dispatch.rows_in_place(kept)  # the model's is a slice past the cls token: no copy
    _unmask_fwd_kernel[dispatch.row_tiles(B * L)](kept, mt, ids_restore.contiguous(), pos_embed.contiguous(), y,
                                                  B * L, L, D, len_keep, sb, sr, BLOCK=dispatch.block(D))
    return y


def unmask_tokens_bwd(g_out, ids_restore, len_keep, kept_dtype):
    """d(out) (B, L, D) -> d(kept) (B, len_keep, D) in kept_dtype, d(mask_token) (D,) in float32."""
    B, L, D = g_out.shape
    G = dispatch.row_programs(B * L, g_out.device)
    rows = triton.cdiv(B * L, G)
    G = triton.cdiv(B * L, rows)
    g_kept = dispatch.empty(B, len_keep, D, device=g_out.device, dtype=kept_dtype)
    part = dispatch.empty(G, D, device=g_out.device, dtype=torch.float32)
    g_out, sb, sl = dispatch.rows_in_place(g_out)  # in the model a slice of the grad past the cls token: no copy
    _unmask_bwd_kernel[(G,)](g_out, ids_restore.contiguous(), g_kept, part, B * L, L, D, len_keep, rows, sb, sl,
                             BLOCK=dispatch.block(D))
    return g_kept, part.sum(0)
