"""The standard MAE baseline: facebookresearch/mae (models_mae.py + engine_pretrain.py + util/misc.py), as most
people run it today.

Eager PyTorch, timm Blocks (today's timm: attention through F.scaled_dot_product_attention), argsort/gather
masking, norm-pix loss in plain torch, `torch.autocast` + `GradScaler` for fp16 (autocast without a scaler for
bf16, neither for fp32), fp32 parameters, torch.optim.AdamW (default foreach, not fused) over timm's
weight-decay groups, the grad-norm + `loss.item()` of every step of the official loop. No fused kernels, no
DeepSpeed, no torch.compile. Only used by benchmarks/throughput.py (and its test, which checks that it computes
the same loss as our plain MAE for the same weights and mask).
"""
import math
from functools import partial

import torch
from torch import nn
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from timm.optim import param_groups_weight_decay

from mff_ds.models.vit import sincos_pos_embed


class MaskedAutoencoderViT(nn.Module):
    """models_mae.MaskedAutoencoderViT (ViT encoder + light decoder, pixel reconstruction)."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=1024, depth=24, num_heads=16,
                 decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, mlp_ratio=4.,
                 norm_layer=partial(nn.LayerNorm, eps=1e-6), norm_pix_loss=False):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        grid = img_size // patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(sincos_pos_embed(embed_dim, grid), requires_grad=False)
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
                                     for _ in range(depth)])
        self.norm = norm_layer(embed_dim)
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(sincos_pos_embed(decoder_embed_dim, grid), requires_grad=False)
        self.decoder_blocks = nn.ModuleList([Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True,
                                                   norm_layer=norm_layer) for _ in range(decoder_depth)])
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size ** 2 * in_chans, bias=True)
        self.norm_pix_loss = norm_pix_loss
        self.initialize_weights()
        assert num_patches == grid * grid

    def initialize_weights(self):
        w = self.patch_embed.proj.weight.data
        torch.nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        torch.nn.init.normal_(self.cls_token, std=.02)
        torch.nn.init.normal_(self.mask_token, std=.02)
        self.apply(self._init_weights)

    def _init_weights(self, m):
        if isinstance(m, nn.Linear):
            torch.nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    def patchify(self, imgs):
        p = self.patch_embed.patch_size[0]
        h = w = imgs.shape[2] // p
        x = imgs.reshape(shape=(imgs.shape[0], 3, h, p, w, p))
        x = torch.einsum('nchpwq->nhwpqc', x)
        return x.reshape(shape=(imgs.shape[0], h * w, p ** 2 * 3))

    def random_masking(self, x, mask_ratio, noise=None):
        """Per-sample shuffling by argsort of random noise (`noise` given: fixed mask, for the equality test)."""
        N, L, D = x.shape
        len_keep = int(L * (1 - mask_ratio))
        if noise is None:
            noise = torch.rand(N, L, device=x.device)  # noise in [0, 1]
        ids_shuffle = torch.argsort(noise, dim=1)  # ascend: small is keep, large is remove
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, D))
        mask = torch.ones([N, L], device=x.device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, dim=1, index=ids_restore)
        return x_masked, mask, ids_restore

    def forward_encoder(self, x, mask_ratio, noise=None):
        x = self.patch_embed(x)
        x = x + self.pos_embed[:, 1:, :]
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)
        cls_token = self.cls_token + self.pos_embed[:, :1, :]
        x = torch.cat((cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, x, ids_restore):
        x = self.decoder_embed(x)
        mask_tokens = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
        x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
        x = torch.cat([x[:, :1, :], x_], dim=1)
        x = x + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_norm(x)
        return self.decoder_pred(x)[:, 1:, :]

    def forward_loss(self, imgs, pred, mask):
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.e-6) ** .5
        loss = (pred - target) ** 2
        loss = loss.mean(dim=-1)  # [N, L], mean loss per patch
        return (loss * mask).sum() / mask.sum()  # mean loss on removed patches

    def forward(self, imgs, mask_ratio=0.75, noise=None):
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask


def build_baseline(cfg) -> MaskedAutoencoderViT:
    """The official model for a mff_ds ModelConfig (encoder, decoder, patch, norm-pix; no fusion)."""
    return MaskedAutoencoderViT(cfg.img_size, cfg.patch_size, cfg.in_chans, cfg.embed_dim, cfg.depth, cfg.num_heads,
                                cfg.decoder_embed_dim, cfg.decoder_depth, cfg.decoder_num_heads, cfg.mlp_ratio,
                                norm_pix_loss=cfg.norm_pix_loss)


def get_grad_norm_(parameters, norm_type: float = 2.0) -> torch.Tensor:
    parameters = [p for p in parameters if p.grad is not None]
    if not parameters:
        return torch.tensor(0.)
    device = parameters[0].grad.device
    return torch.norm(torch.stack([torch.norm(p.grad.detach(), norm_type).to(device) for p in parameters]), norm_type)


class NativeScalerWithGradNormCount:
    """util/misc.py: backward with GradScaler, unscale, grad norm, step, update."""

    def __init__(self, enabled: bool):
        self._scaler = torch.amp.GradScaler("cuda", enabled=enabled)

    def __call__(self, loss, optimizer, parameters):
        self._scaler.scale(loss).backward()
        self._scaler.unscale_(optimizer)
        norm = get_grad_norm_(parameters)
        self._scaler.step(optimizer)
        self._scaler.update()
        return norm


class BaselineTrainer:
    """One official training iteration per `step(samples)` (engine_pretrain.train_one_epoch, accum_iter 1)."""

    AMP = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

    def __init__(self, model: MaskedAutoencoderViT, precision: str, device: torch.device, lr: float = 1.5e-4,
                 weight_decay: float = 0.05, mask_ratio: float = 0.75):
        if precision not in self.AMP:
            raise ValueError(f"precision: expected one of {list(self.AMP)}, got {precision!r}")
        if precision == "fp16" and device.type != "cuda":
            raise ValueError(f"precision: fp16 (GradScaler) needs a CUDA device, got {device.type}")
        self.model = model.to(device)
        self.device, self.mask_ratio = device, mask_ratio
        self.amp_dtype = self.AMP[precision]
        groups = param_groups_weight_decay(model, weight_decay)  # timm add_weight_decay: no decay on 1-D / bias
        self.optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))
        self.loss_scaler = NativeScalerWithGradNormCount(enabled=precision == "fp16")

    def step(self, samples: torch.Tensor) -> float:
        self.model.train()
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            loss, _, _ = self.model(samples, mask_ratio=self.mask_ratio)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise RuntimeError(f"Loss is {loss_value}, stopping training")
        self.loss_scaler(loss, self.optimizer, parameters=self.model.parameters())
        self.optimizer.zero_grad()
        return loss_value
