"""Random patch masking (encoder side) and its inverse (decoder side).

Reference semantics (mmpretrain / official MAE): ids_shuffle = argsort(noise) (smallest noise kept),
ids_restore = argsort(ids_shuffle), kept = gather(tokens + pos, ids_shuffle[:, :len_keep]),
mask = 1 for removed patches, in original patch order.
"""
import torch

from ._dispatch import resolve_impl


def masking_indices(noise: torch.Tensor, len_keep: int):
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    mask = (ids_restore >= len_keep).to(noise.dtype)
    return ids_keep, ids_restore, mask


def random_masking_reference(tokens, pos_embed, noise, len_keep):
    ids_keep, ids_restore, mask = masking_indices(noise, len_keep)
    x = tokens + pos_embed
    kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    return kept, mask, ids_restore, ids_keep


def unmask_tokens_reference(kept, mask_token, ids_restore, pos_embed):
    B, L = ids_restore.shape
    D = kept.shape[-1]
    x = torch.cat([kept, mask_token.expand(B, L - kept.shape[1], D).to(kept.dtype)], dim=1)
    x = torch.gather(x, 1, ids_restore.unsqueeze(-1).expand(-1, -1, D))
    return x + pos_embed


def random_masking(tokens, pos_embed, noise, len_keep, impl="auto"):
    """tokens (B,L,C) without positions, pos_embed (1,L,C), noise (B,L) -> (kept, mask, ids_restore, ids_keep)."""
    if resolve_impl(impl, tokens) == "triton":
        from .masking_triton import random_masking_triton
        return random_masking_triton(tokens, pos_embed, noise, len_keep)
    return random_masking_reference(tokens, pos_embed, noise, len_keep)


def unmask_tokens(kept, mask_token, ids_restore, pos_embed, impl="auto"):
    """kept (B,len_keep,D), mask_token (1,1,D), ids_restore (B,L), pos_embed (1,L,D) -> (B,L,D) in patch order."""
    if resolve_impl(impl, kept) == "triton":
        from .masking_triton import unmask_tokens_triton
        return unmask_tokens_triton(kept, mask_token, ids_restore, pos_embed)
    return unmask_tokens_reference(kept, mask_token, ids_restore, pos_embed)
