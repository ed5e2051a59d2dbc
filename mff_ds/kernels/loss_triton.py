"""Triton norm-pix MAE loss, forward and backward, without materialising patches or the normalised target.

One program per patch reads its pixels straight from the (B, C, H, W) image with patchify addressing (inner
order p, q, c), computes the patch mean and unbiased variance in float32, and the mean squared error against
pred. Unmasked patches (mask == 0) are skipped: they do not change the loss or its gradient (for finite
inputs). The masked mean over the per-patch losses is a tiny torch reduction (deterministic, no host sync).
Backward recomputes the target from the image (no saved target): d(pred) = 2 (pred - t) mask / (P sum(mask)).
Images get no gradient.
"""
import torch
import triton
import triton.language as tl

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_empty = torch.empty  # allocation hook for every buffer a kernel fills; tests swap in a NaN-filling one


def _settings(n):
    block = triton.next_power_of_2(n)
    return block, 4 if block <= 1024 else 8 if block <= 4096 else 16


@triton.jit
def _patch(img_ptr, pred_ptr, mask_ptr, row, L, GW, H, W, P, eps,
           PATCH: tl.constexpr, CH: tl.constexpr, NORM: tl.constexpr, BLOCK: tl.constexpr):
    """(pred - target) over one patch (0 outside it and for unmasked patches), and its mask value."""
    b = row // L
    l = row % L
    hi = l // GW
    wi = l % GW
    e = tl.arange(0, BLOCK)
    c = e % CH
    q = (e // CH) % PATCH
    pp = e // (CH * PATCH)
    msk = tl.load(mask_ptr + row)
    m = e < tl.where(msk != 0.0, P, 0)  # whole patch off when unmasked
    img_off = (b * CH + c) * H * W + (hi * PATCH + pp) * W + wi * PATCH + q
    x = tl.load(img_ptr + img_off, mask=m, other=0.0).to(tl.float32)
    pr = tl.load(pred_ptr + row * P + e, mask=m, other=0.0).to(tl.float32)
    if NORM:
        mean = tl.sum(x, axis=0) / P
        xc = tl.where(m, x - mean, 0.0)
        var = tl.sum(xc * xc, axis=0) / (P - 1)
        x = xc / tl.sqrt(var + eps)
    return tl.where(m, pr - x, 0.0), msk


@triton.jit
def _npl_fwd_kernel(img_ptr, pred_ptr, mask_ptr, loss_ptr, L, GW, H, W, P, eps,
                    PATCH: tl.constexpr, CH: tl.constexpr, NORM: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # b * L + l
    d, msk = _patch(img_ptr, pred_ptr, mask_ptr, row, L, GW, H, W, P, eps, PATCH, CH, NORM, BLOCK)
    tl.store(loss_ptr + row, tl.sum(d * d, axis=0) / P)


@triton.jit
def _npl_bwd_kernel(img_ptr, pred_ptr, mask_ptr, coef_ptr, dpred_ptr, L, GW, H, W, P, eps,
                    PATCH: tl.constexpr, CH: tl.constexpr, NORM: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    d, msk = _patch(img_ptr, pred_ptr, mask_ptr, row, L, GW, H, W, P, eps, PATCH, CH, NORM, BLOCK)
    coef = tl.load(coef_ptr) * msk * (2.0 / P)  # coef = d(loss) / sum(mask)
    e = tl.arange(0, BLOCK)
    tl.store(dpred_ptr + row * P + e, (d * coef).to(dpred_ptr.dtype.element_ty), mask=e < P)


def _launch(kernel, ctx_args, extra, grid):
    img, pred, maskf, p, eps, norm = ctx_args
    B, CH, H, W = img.shape
    L, P = pred.shape[1], pred.shape[2]
    block, warps = _settings(P)
    kernel[grid](img, pred, maskf, *extra, L, W // p, H, W, P, eps,
                 PATCH=p, CH=CH, NORM=norm, BLOCK=block, num_warps=warps)


class NormPixLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pred, images, mask, patch_size, eps, norm_pix):
        pred, images = pred.contiguous(), images.contiguous()
        maskf = mask.detach().to(torch.float32).contiguous()
        B, L = maskf.shape
        per_patch = _empty(B, L, device=pred.device, dtype=torch.float32)
        args = (images, pred, maskf, patch_size, float(eps), bool(norm_pix))
        _launch(_npl_fwd_kernel, args, (per_patch,), (B * L,))
        msum = maskf.sum()
        loss = (per_patch * maskf).sum() / msum
        ctx.save_for_backward(pred, images, maskf, msum)
        ctx.meta = (patch_size, float(eps), bool(norm_pix))
        out_dtype = torch.promote_types(torch.promote_types(pred.dtype, images.dtype), mask.dtype)
        return loss.to(out_dtype if out_dtype.is_floating_point else torch.float32)

    @staticmethod
    def backward(ctx, g):
        pred, images, maskf, msum = ctx.saved_tensors
        p, eps, norm = ctx.meta
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        coef = (g.float() / msum).reshape(1).contiguous()
        dpred = _empty(pred.shape, device=pred.device, dtype=pred.dtype)
        B, L = maskf.shape
        _launch(_npl_bwd_kernel, (images, pred, maskf, p, eps, norm), (coef, dpred), (B * L,))
        return dpred, None, None, None, None, None


def norm_pix_loss_triton(pred, images, mask, patch_size, eps=1e-6, norm_pix=True):
    """Same contract as loss.norm_pix_loss_reference; images get no gradient."""
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
    for name, t in (("pred", pred), ("images", images)):
        if t.dtype not in _DTYPES:
            raise TypeError(f"norm_pix_loss: {name} dtype must be in {_DTYPES}, got {t.dtype}")
    return NormPixLoss.apply(pred, images, mask, p, eps, norm_pix)
