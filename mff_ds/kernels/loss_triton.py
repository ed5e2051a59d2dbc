"""Triton norm-pix MAE loss per patch, forward and backward launchers of the custom ops in loss.py, without
materialising patches or the normalised target.

One program per patch reads its pixels straight from the (B, C, H, W) image with patchify addressing (inner
order p, q, c), computes the patch mean and unbiased variance in float32, and the mean squared error against
pred. Unmasked patches (mask == 0) are skipped (loss 0, gradient 0): they do not change the loss or its
gradient (for finite inputs). Backward recomputes the target from the image (no saved target):
d(pred) = 2 (pred - t) d(per-patch loss) / P. Images get no gradient.
"""
import torch
import triton
import triton.language as tl

from . import dispatch


@triton.jit
def _patches(img_ptr, pred_ptr, mask_ptr, rows, BL, L, GW, H, W, P, eps, pred_sb, pred_sl,
             PATCH: tl.constexpr, CH: tl.constexpr, NORM: tl.constexpr, BLOCK: tl.constexpr):
    """(pred - target) over R patches, one a row (0 outside a patch and for unmasked patches), and their mask."""
    rm = rows < BL
    b = rows // L
    l = rows % L
    hi = l // GW
    wi = l % GW
    e = tl.arange(0, BLOCK)
    c = e % CH
    q = (e // CH) % PATCH
    pp = e // (CH * PATCH)
    msk = tl.load(mask_ptr + rows, mask=rm, other=0.0)
    m = (msk != 0.0)[:, None] & (e < P)[None, :]  # whole patch off when unmasked
    img_off = ((b * CH)[:, None] + c[None, :]) * H * W + ((hi * PATCH)[:, None] + pp[None, :]) * W \
        + (wi * PATCH)[:, None] + q[None, :]
    x = tl.load(img_ptr + img_off, mask=m, other=0.0).to(tl.float32)
    pr = tl.load(pred_ptr + (b * pred_sb + l * pred_sl)[:, None] + e[None, :], mask=m, other=0.0).to(tl.float32)
    if NORM:
        mean = tl.sum(x, axis=1) / P
        xc = tl.where(m, x - mean[:, None], 0.0)
        var = tl.sum(xc * xc, axis=1) / (P - 1)
        x = xc / tl.sqrt(var + eps)[:, None]
    return tl.where(m, pr - x, 0.0), msk


_TILES = [(4, 4), (1, 4), (2, 8), (8, 8)]  # (patches per tile, warps); the first is the interpreter's


@dispatch.autotune(_TILES, key=["P", "NORM"])
@triton.jit
def _npl_fwd_kernel(img_ptr, pred_ptr, mask_ptr, loss_ptr, BL, L, GW, H, W, P, eps, pred_sb, pred_sl,
                    PATCH: tl.constexpr, CH: tl.constexpr, NORM: tl.constexpr, BLOCK: tl.constexpr, R: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * R + tl.arange(0, R)  # b * L + l
    d, msk = _patches(img_ptr, pred_ptr, mask_ptr, rows, BL, L, GW, H, W, P, eps, pred_sb, pred_sl,
                      PATCH, CH, NORM, BLOCK)
    tl.store(loss_ptr + rows, tl.sum(d * d, axis=1) / P, mask=rows < BL)


@dispatch.autotune(_TILES, key=["P", "NORM"])
@triton.jit
def _npl_bwd_kernel(img_ptr, pred_ptr, mask_ptr, gloss_ptr, dpred_ptr, BL, L, GW, H, W, P, eps, pred_sb, pred_sl,
                    PATCH: tl.constexpr, CH: tl.constexpr, NORM: tl.constexpr, BLOCK: tl.constexpr, R: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * R + tl.arange(0, R)
    d, msk = _patches(img_ptr, pred_ptr, mask_ptr, rows, BL, L, GW, H, W, P, eps, pred_sb, pred_sl,
                      PATCH, CH, NORM, BLOCK)
    rm = rows < BL
    coef = tl.load(gloss_ptr + rows, mask=rm & (msk != 0.0), other=0.0) * (2.0 / P)
    e = tl.arange(0, BLOCK)
    tl.store(dpred_ptr + (rows * P)[:, None] + e[None, :], (d * coef[:, None]).to(dpred_ptr.dtype.element_ty),
             mask=rm[:, None] & (e < P)[None, :])


def _launch(kernel, img, pred, maskf, p, eps, norm, out):
    B, CH, H, W = img.shape
    L, P = pred.shape[1], pred.shape[2]
    pred, sb, sl = dispatch.rows_in_place(pred)  # the model's is a slice past the cls token: no copy
    kernel[dispatch.row_tiles(B * L)](
        img.contiguous(), pred, maskf.contiguous(), *out, B * L, L, W // p, H, W, P, eps, sb, sl,
        PATCH=p, CH=CH, NORM=norm, BLOCK=dispatch.block(P))


def norm_pix_loss_fwd(pred, images, maskf, patch_size, eps, norm_pix):
    """-> per-patch loss (B, L) float32, 0 where maskf == 0."""
    per_patch = dispatch.empty(maskf.shape, device=pred.device, dtype=torch.float32)
    _launch(_npl_fwd_kernel, images, pred, maskf, patch_size, eps, norm_pix, (per_patch,))
    return per_patch


def norm_pix_loss_bwd(g_loss, pred, images, maskf, patch_size, eps, norm_pix):
    """d(per-patch loss) (B, L) -> d(pred)."""
    dpred = dispatch.empty(pred.shape, device=pred.device, dtype=pred.dtype)
    _launch(_npl_bwd_kernel, images, pred, maskf, patch_size, eps, norm_pix, (g_loss.float().contiguous(), dpred))
    return dpred
