"""Norm-pix MAE loss: per-patch normalised pixel target, MSE per patch, mean over masked patches.

The fused version is the `torch.library` custom op mff_ds::norm_pix_loss (+ its backward op); loss_triton.py
holds the Triton kernels. Like them, the op computes in float32: on other devices it runs the reference on
float32 copies (its backward op differentiates that).
"""
import torch

from . import dispatch


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


def _target(images, patch_size, eps, norm_pix):
    target = patchify(images, patch_size)
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + eps) ** 0.5
    return target


def _per_patch(pred, images, patch_size, eps, norm_pix):
    return ((pred - _target(images, patch_size, eps, norm_pix)) ** 2).mean(dim=-1)


def _masked_mean(per_patch, mask):
    return (per_patch * mask).sum() / mask.sum()


def norm_pix_loss_reference(pred, images, mask, patch_size, eps=1e-6, norm_pix=True):
    return _masked_mean(_per_patch(pred, images, patch_size, eps, norm_pix), mask)


def _check(pred, images, mask, patch_size, norm_pix):
    if images.dim() != 4:
        raise ValueError(f"norm_pix_loss: images must be (B, C, H, W), got shape {tuple(images.shape)}")
    B, CH, H, W = images.shape
    p = int(patch_size)
    if p <= 0 or H % p or W % p:
        raise ValueError(f"norm_pix_loss: image size {H}x{W} must be a multiple of patch_size, got {patch_size}")
    L, P = (H // p) * (W // p), p * p * CH
    if tuple(pred.shape) != (B, L, P):
        raise ValueError(f"norm_pix_loss: pred must be ({B}, {L}, {P}) for {H}x{W} images with patch {p}, "
                         f"got {tuple(pred.shape)}")
    if tuple(mask.shape) != (B, L):
        raise ValueError(f"norm_pix_loss: mask must be ({B}, {L}), got {tuple(mask.shape)}")
    if norm_pix and P < 2:
        raise ValueError(f"norm_pix_loss: norm_pix needs at least 2 values per patch, got {P}")
    dispatch.check_dtype("norm_pix_loss pred", pred)
    dispatch.check_dtype("norm_pix_loss images", images)
    dispatch.check_devices("norm_pix_loss", pred=pred, images=images, mask=mask)


# The fused op computes the per-patch losses (0 where mask == 0, whose pixels the kernels never read); the
# masked mean over them is a tiny torch reduction around it (deterministic, no host sync).
def _op_reference(pred, images, mask, patch_size, eps, norm_pix):
    """What the op computes, by the reference (on other devices than the kernels')."""
    return torch.where(mask != 0, _per_patch(pred.float(), images.float(), patch_size, eps, norm_pix), 0.0)


@torch.library.custom_op("mff_ds::norm_pix_loss", mutates_args=())
def _loss_op(pred: torch.Tensor, images: torch.Tensor, mask: torch.Tensor, patch_size: int, eps: float,
             norm_pix: bool) -> torch.Tensor:
    """mask: (B, L) float32 -> per-patch loss (B, L) float32."""
    if dispatch.runs_triton(pred):
        from .loss_triton import norm_pix_loss_fwd
        return norm_pix_loss_fwd(pred, images, mask, patch_size, eps, norm_pix)
    return _op_reference(pred, images, mask, patch_size, eps, norm_pix)


@_loss_op.register_fake
def _(pred, images, mask, patch_size, eps, norm_pix):
    return mask.new_empty(mask.shape, dtype=torch.float32)


@torch.library.custom_op("mff_ds::norm_pix_loss_backward", mutates_args=())
def _loss_bwd_op(g_loss: torch.Tensor, pred: torch.Tensor, images: torch.Tensor, mask: torch.Tensor,
                 patch_size: int, eps: float, norm_pix: bool) -> torch.Tensor:
    """d(per-patch loss) (B, L) -> d(pred)."""
    if dispatch.runs_triton(pred):
        from .loss_triton import norm_pix_loss_bwd
        return norm_pix_loss_bwd(g_loss, pred, images, mask, patch_size, eps, norm_pix)
    (g,) = dispatch.reference_vjp(lambda pr: _op_reference(pr, images, mask, patch_size, eps, norm_pix), [pred],
                                  g_loss.float())
    return g


@_loss_bwd_op.register_fake
def _(g_loss, pred, images, mask, patch_size, eps, norm_pix):
    return pred.new_empty(pred.shape)


def _loss_setup(ctx, inputs, output):
    pred, images, mask, *ctx.args = inputs
    ctx.save_for_backward(pred, images, mask)


def _loss_backward(ctx, g_loss):
    pred, images, mask = ctx.saved_tensors
    dpred = _loss_bwd_op(g_loss, pred, images, mask, *ctx.args) if ctx.needs_input_grad[0] else None
    return dpred, None, None, None, None, None


_loss_op.register_autograd(_loss_backward, setup_context=_loss_setup)


def norm_pix_loss(pred, images, mask, patch_size, eps=1e-6, norm_pix=True, impl="auto"):
    """pred (B,L,p*p*3), images (B,3,H,W), mask (B,L) 1 = masked -> scalar loss. The fused op gives images
    no gradient."""
    _check(pred, images, mask, patch_size, norm_pix)
    if dispatch.resolve_impl(impl, pred) != "triton":
        return norm_pix_loss_reference(pred, images, mask, patch_size, eps, norm_pix)
    maskf = mask.detach().to(torch.float32)
    loss = _masked_mean(_loss_op(pred, images.detach(), maskf, int(patch_size), float(eps), bool(norm_pix)), maskf)
    out_dtype = torch.promote_types(torch.promote_types(pred.dtype, images.dtype), mask.dtype)
    return loss.to(out_dtype if out_dtype.is_floating_point else torch.float32)
