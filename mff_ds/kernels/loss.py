"""Norm-pix MAE loss: per-patch normalised pixel target, MSE per patch, mean over masked patches."""
import torch

from ._dispatch import resolve_impl


def patchify(images, patch_size):
    """(B,3,H,W) -> (B, L, p*p*3), patch order row-major, inner order (p, q, c) as MAE/mmpretrain."""
    B, C, H, W = images.shape
    p = patch_size
    h, w = H // p, W // p
    x = images.reshape(B, C, h, p, w, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(B, h * w, p * p * C)


def unpatchify(patches, patch_size, channels=3):
    """(B, L, p*p*C) -> (B, C, H, W) for a square grid."""
    B, L, _ = patches.shape
    p = patch_size
    h = w = int(round(L ** 0.5))
    x = patches.reshape(B, h, w, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(B, channels, h * p, w * p)


def norm_pix_loss_reference(pred, images, mask, patch_size, eps=1e-6, norm_pix=True):
    target = patchify(images, patch_size)
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + eps) ** 0.5
    per_patch = ((pred - target) ** 2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum()


def norm_pix_loss(pred, images, mask, patch_size, eps=1e-6, norm_pix=True, impl="auto"):
    """pred (B,L,p*p*3), images (B,3,H,W), mask (B,L) 1 = masked -> scalar loss."""
    if resolve_impl(impl, pred) == "triton":
        from .loss_triton import norm_pix_loss_triton
        return norm_pix_loss_triton(pred, images, mask, patch_size, eps, norm_pix)
    return norm_pix_loss_reference(pred, images, mask, patch_size, eps, norm_pix)
