"""Random patch masking (encoder side) and its inverse (decoder side).

Reference semantics (mmpretrain / official MAE): ids_shuffle = argsort(noise) (smallest noise kept),
ids_restore = argsort(ids_shuffle), kept = gather(tokens + pos, ids_shuffle[:, :len_keep]),
mask = 1 for removed patches, in original patch order.

The fused versions are `torch.library` custom ops (mff_ds::random_masking, mff_ds::unmask_tokens and their
backward ops), so torch.compile traces them as single nodes; masking_triton.py holds the Triton kernels, and
on other devices the ops run the references (their backward ops differentiate them).
"""
import torch

from . import dispatch


def _indices(noise, len_keep):
    """-> ids_shuffle (the whole permutation, smallest noise first), ids_restore (its inverse), mask."""
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    return ids_shuffle, ids_restore, (ids_restore >= len_keep).to(noise.dtype)


def _masking(tokens, pos_embed, noise, len_keep):
    """The reference, returning the whole permutation ids_shuffle (ids_keep = ids_shuffle[:, :len_keep])."""
    ids_shuffle, ids_restore, mask = _indices(noise, len_keep)
    x = tokens + pos_embed
    kept = torch.gather(x, 1, ids_shuffle[:, :len_keep, None].expand(-1, -1, x.shape[-1]))
    return kept, mask, ids_restore, ids_shuffle


def random_masking_reference(tokens, pos_embed, noise, len_keep):
    kept, mask, ids_restore, ids_shuffle = _masking(tokens, pos_embed, noise, len_keep)
    return kept, mask, ids_restore, ids_shuffle[:, :len_keep]


def unmask_tokens_reference(kept, mask_token, ids_restore, pos_embed):
    B, L = ids_restore.shape
    D = kept.shape[-1]
    x = torch.cat([kept, mask_token.expand(B, L - kept.shape[1], D).to(kept.dtype)], dim=1)
    x = torch.gather(x, 1, ids_restore.unsqueeze(-1).expand(-1, -1, D))
    return x + pos_embed


# ------------------------------------------------------------------------------------------------ checks
def _check_noise(op, noise, len_keep, B, L):
    if tuple(noise.shape) != (B, L):
        raise ValueError(f"{op}: noise must be ({B}, {L}), got {tuple(noise.shape)}")
    if not noise.is_floating_point():
        raise TypeError(f"{op}: noise must be floating point, got {noise.dtype}")
    if not 0 <= int(len_keep) <= L:
        raise ValueError(f"{op}: len_keep must be in [0, {L}], got {len_keep}")


def _check_masking(tokens, pos_embed, noise, len_keep):
    if tokens.dim() != 3:
        raise ValueError(f"random_masking: tokens must be (B, L, C), got shape {tuple(tokens.shape)}")
    B, L, C = tokens.shape
    if tuple(pos_embed.shape) != (1, L, C):
        raise ValueError(f"random_masking: pos_embed must be (1, {L}, {C}), got {tuple(pos_embed.shape)}")
    _check_noise("random_masking", noise, len_keep, B, L)
    dispatch.check_dtype("random_masking tokens", tokens)
    dispatch.check_dtype("random_masking pos_embed", pos_embed)
    dispatch.check_devices("random_masking", tokens=tokens, pos_embed=pos_embed, noise=noise)


def _check_unmask(kept, mask_token, ids_restore, pos_embed):
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
        dispatch.check_dtype(f"unmask_tokens {name}", t)
    dispatch.check_devices("unmask_tokens", kept=kept, mask_token=mask_token, ids_restore=ids_restore,
                           pos_embed=pos_embed)


# ------------------------------------------------------------------------------------- random masking op
@torch.library.custom_op("mff_ds::random_masking", mutates_args=())
def _masking_op(tokens: torch.Tensor, pos_embed: torch.Tensor, noise: torch.Tensor,
                len_keep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> kept, mask, ids_restore, ids_shuffle (the whole permutation: an op's outputs may not alias)."""
    if dispatch.runs_triton(tokens):
        from .masking_triton import random_masking_fwd
        return random_masking_fwd(tokens, pos_embed, noise, len_keep)
    return _masking(tokens, pos_embed, noise, len_keep)


@_masking_op.register_fake
def _(tokens, pos_embed, noise, len_keep):
    B, L, C = tokens.shape
    ids = noise.new_empty(B, L, dtype=torch.int64)
    return (tokens.new_empty(B, len_keep, C, dtype=torch.result_type(tokens, pos_embed)), noise.new_empty(B, L),
            ids, torch.empty_like(ids))


@torch.library.custom_op("mff_ds::random_masking_backward", mutates_args=())
def _masking_bwd_op(g_kept: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
    """d(kept) (B, len_keep, C) -> d(tokens + positions) (B, L, C), zeros at removed patches."""
    if dispatch.runs_triton(g_kept):
        from .masking_triton import random_masking_bwd
        return random_masking_bwd(g_kept, ids_restore)
    # kept is linear in tokens + positions: differentiate at zeros. ids_restore ranks the patches as the
    # noise did, so as noise it gives the same permutation.
    B, len_keep, C = g_kept.shape
    x = g_kept.new_zeros(B, ids_restore.shape[1], C)
    (g,) = dispatch.reference_vjp(lambda t: _masking(t, t.new_zeros(()), ids_restore, len_keep)[0], [x], g_kept)
    return g


@_masking_bwd_op.register_fake
def _(g_kept, ids_restore):
    return g_kept.new_empty(*ids_restore.shape, g_kept.shape[2])


def _masking_setup(ctx, inputs, output):
    tokens, pos_embed = inputs[:2]
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(output[2])
    ctx.dtypes = tokens.dtype, pos_embed.dtype


def _masking_backward(ctx, g_kept, _g_mask, _g_restore, _g_shuffle):
    (ids_restore,) = ctx.saved_tensors
    need_tok, need_pos = ctx.needs_input_grad[:2]
    g = _masking_bwd_op(g_kept, ids_restore)
    return (g.to(ctx.dtypes[0]) if need_tok else None,
            g.sum(0, keepdim=True).to(ctx.dtypes[1]) if need_pos else None, None, None)


_masking_op.register_autograd(_masking_backward, setup_context=_masking_setup)


# --------------------------------------------------------------------------------------- unmasking op
@torch.library.custom_op("mff_ds::unmask_tokens", mutates_args=())
def _unmask_op(kept: torch.Tensor, mask_token: torch.Tensor, ids_restore: torch.Tensor,
               pos_embed: torch.Tensor) -> torch.Tensor:
    """mask_token: (D,)."""
    if dispatch.runs_triton(kept):
        from .masking_triton import unmask_tokens_fwd
        return unmask_tokens_fwd(kept, mask_token, ids_restore, pos_embed)
    return unmask_tokens_reference(kept, mask_token, ids_restore, pos_embed)


@_unmask_op.register_fake
def _(kept, mask_token, ids_restore, pos_embed):
    return kept.new_empty(*ids_restore.shape, kept.shape[2], dtype=torch.result_type(kept, pos_embed))


@torch.library.custom_op("mff_ds::unmask_tokens_backward", mutates_args=())
def _unmask_bwd_op(g_out: torch.Tensor, ids_restore: torch.Tensor, len_keep: int,
                   kept_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """d(out) (B, L, D), in out's dtype -> d(kept) (B, len_keep, D) in kept_dtype, d(mask_token) (D,) in float32
    (the reference sums it in the mask token's dtype; float32 is at least as exact)."""
    if dispatch.runs_triton(g_out):
        from .masking_triton import unmask_tokens_bwd
        return unmask_tokens_bwd(g_out, ids_restore, len_keep, kept_dtype)
    # out is linear in kept and the mask token: differentiate at zeros; a float32 mask token makes the
    # reference sum its gradient in float32, and positions in out's dtype give out's dtype
    B, L, D = g_out.shape
    kept = g_out.new_zeros(B, len_keep, D, dtype=kept_dtype)
    mask_token, pos_embed = g_out.new_zeros(D, dtype=torch.float32), g_out.new_zeros(1, 1, D)
    g_kept, g_mt = dispatch.reference_vjp(lambda k, m: unmask_tokens_reference(k, m, ids_restore, pos_embed),
                                          [kept, mask_token], g_out)
    return g_kept, g_mt


@_unmask_bwd_op.register_fake
def _(g_out, ids_restore, len_keep, kept_dtype):
    B, L, D = g_out.shape
    return g_out.new_empty(B, len_keep, D, dtype=kept_dtype), g_out.new_empty(D, dtype=torch.float32)


def _unmask_setup(ctx, inputs, output):
    kept, mask_token, ids_restore, pos_embed = inputs
    ctx.save_for_backward(ids_restore)
    ctx.meta = kept.shape[1], kept.dtype, mask_token.dtype, pos_embed.dtype, output.dtype


def _unmask_backward(ctx, g_out):
    (ids_restore,) = ctx.saved_tensors
    len_keep, kept_dtype, mt_dtype, pos_dtype, dtype = ctx.meta
    need_kept, need_mt, _, need_pos = ctx.needs_input_grad
    g_out = g_out.to(dtype)
    g_kept = g_mt = None
    if need_kept or need_mt:
        g_kept, g_mt = _unmask_bwd_op(g_out, ids_restore, len_keep, kept_dtype)
    return (g_kept if need_kept else None, g_mt.to(mt_dtype) if need_mt else None, None,
            g_out.sum(0, keepdim=True).to(pos_dtype) if need_pos else None)


_unmask_op.register_autograd(_unmask_backward, setup_context=_unmask_setup)


# ---------------------------------------------------------------------------------- public dispatchers
def masking_indices(noise: torch.Tensor, len_keep: int):
    """noise (B, L) -> (ids_keep, ids_restore, mask) of the reference."""
    if noise.dim() != 2:
        raise ValueError(f"masking_indices: noise must be (B, L), got shape {tuple(noise.shape)}")
    _check_noise("masking_indices", noise, len_keep, *noise.shape)
    ids_shuffle, ids_restore, mask = _indices(noise, len_keep)
    return ids_shuffle[:, :len_keep], ids_restore, mask


def random_masking(tokens, pos_embed, noise, len_keep, impl="auto"):
    """tokens (B,L,C) without positions, pos_embed (1,L,C), noise (B,L) -> (kept, mask, ids_restore, ids_keep)."""
    _check_masking(tokens, pos_embed, noise, len_keep)
    if dispatch.resolve_impl(impl, tokens) != "triton":
        return random_masking_reference(tokens, pos_embed, noise, len_keep)
    kept, mask, ids_restore, ids_shuffle = _masking_op(tokens, pos_embed, noise, int(len_keep))
    return kept, mask, ids_restore, ids_shuffle[:, :len_keep]


def unmask_tokens(kept, mask_token, ids_restore, pos_embed, impl="auto"):
    """kept (B,len_keep,D), mask_token (1,1,D), ids_restore (B,L), pos_embed (1,L,D) -> (B,L,D) in patch order.
    ids_restore must be a permutation of range(L) per row (as random_masking returns it); it is not checked
    (that would need a sync with the GPU)."""
    _check_unmask(kept, mask_token, ids_restore, pos_embed)
    if dispatch.resolve_impl(impl, kept) != "triton":
        return unmask_tokens_reference(kept, mask_token, ids_restore, pos_embed)
    return _unmask_op(kept, mask_token.reshape(-1), ids_restore, pos_embed)
