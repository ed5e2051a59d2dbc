"""MaskedAutoencoder: one class for MFF (K fused levels) and plain MAE (K = 1).

images -> patch embed -> random masking (+positions) -> [cls] + kept -> encoder blocks, collecting the
outputs of `out_indices` -> MFF fusion (Linear per level but the last, softmax weights, sum) -> final LN
-> decoder (embed, mask tokens back in patch order, positions, blocks, norm, pixel head) -> norm-pix loss.
Numerically this is mmpretrain 1.2.0's MFF / MAE (see shared docs/mff-reference.md).
"""
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from timm.layers import PatchEmbed

from .. import kernels
from .archs import ModelConfig, resolve_config
from .vit import LayerNorm, fixed_param, make_blocks, sincos_pos_embed


@dataclass
class MAEOutput:
    loss: torch.Tensor            # scalar
    pred: torch.Tensor            # (B, L, p*p*C)
    mask: torch.Tensor            # (B, L), 1 = masked
    ids_restore: torch.Tensor     # (B, L)
    latent: torch.Tensor          # (B, 1 + len_keep, C), after fusion and the final norm
    fusion_weights: Optional[torch.Tensor]  # (K,) softmaxed, None for plain MAE


class MaskedAutoencoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        C, D, L = cfg.embed_dim, cfg.decoder_embed_dim, cfg.num_patches
        grid = cfg.img_size // cfg.patch_size
        # encoder
        self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, C)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, C))
        self.pos_embed = fixed_param(sincos_pos_embed(C, grid))
        self.blocks = make_blocks(C, cfg.depth, cfg.num_heads, cfg.mlp_ratio)
        self.norm = LayerNorm(C)
        # MFF fusion: proj for every level but the last ("main") one, K logits softmaxed at each forward
        self.levels = cfg.levels
        K = len(self.levels)
        if K > 1:
            self.fusion_proj = nn.ModuleList(nn.Linear(C, C) for _ in range(K - 1))
            self.fusion_logits = nn.Parameter(torch.ones(K))
        # decoder
        self.decoder_embed = nn.Linear(C, D)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, D))
        self.decoder_pos_embed = fixed_param(sincos_pos_embed(D, grid))
        self.decoder_blocks = make_blocks(D, cfg.decoder_depth, cfg.decoder_num_heads, cfg.decoder_mlp_ratio)
        self.decoder_norm = LayerNorm(D)
        self.decoder_pred = nn.Linear(D, cfg.patch_size ** 2 * cfg.in_chans)
        self._last_block = max(self.levels)
        self._proj_of = {b: j for j, b in enumerate(self.levels[:-1])}  # block index -> proj index
        self.init_weights()
        assert self.num_patches == L

    @property
    def num_patches(self) -> int:
        return self.patch_embed.num_patches

    @property
    def is_mff(self) -> bool:
        return len(self.levels) > 1

    def init_weights(self):
        """mmpretrain's scheme (reference 2.4): Xavier-uniform Linear with zero bias, LN 1/0, encoder FFN
        biases N(0, 1e-6), patch-embed Xavier on the flattened kernel (conv bias keeps torch's default),
        cls/mask tokens N(0, 0.02), fusion logits ones."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for blk in self.blocks:
            nn.init.normal_(blk.mlp.fc1.bias, std=1e-6)
            nn.init.normal_(blk.mlp.fc2.bias, std=1e-6)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    # ---------------------------------------------------------------- checks
    def _check_inputs(self, images, noise):
        cfg = self.cfg
        want = (cfg.in_chans, cfg.img_size, cfg.img_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != want:
            raise ValueError(f"images: expected shape (B, {want[0]}, {want[1]}, {want[2]}), got {tuple(images.shape)}")
        if noise is not None and tuple(noise.shape) != (images.shape[0], self.num_patches):
            raise ValueError(f"noise: expected shape (B, L) = ({images.shape[0]}, {self.num_patches}), "
                             f"got {tuple(noise.shape)}")

    # ---------------------------------------------------------------- parts
    def _run(self, blk, x):
        if self.cfg.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(blk, x, use_reentrant=False)
        return blk(x)

    def fusion_weights(self) -> Optional[torch.Tensor]:
        return torch.softmax(self.fusion_logits, dim=0) if self.is_mff else None

    def forward_encoder(self, images, noise):
        impl = self.cfg.kernels
        x = self.patch_embed(images)
        B = x.shape[0]
        kept, mask, ids_restore, _ = kernels.random_masking(x, self.pos_embed[:, 1:], noise, self.cfg.len_keep, impl=impl)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(B, -1, -1)
        x = torch.cat([cls, kept], dim=1)
        feats = []
        for i in range(self._last_block + 1):
            x = self._run(self.blocks[i], x)
            if i in self._proj_of:
                feats.append(self.fusion_proj[self._proj_of[i]](x))
            elif i == self.levels[-1]:
                feats.append(x)
        if not self.is_mff:
            return self.norm(feats[0]), mask, ids_restore
        latent = kernels.fused_fusion_layernorm(feats, self.fusion_logits, self.norm.weight, self.norm.bias,
                                                self.norm.eps, impl=impl)
        return latent, mask, ids_restore

    def forward_decoder(self, latent, ids_restore):
        x = self.decoder_embed(latent)
        patches = kernels.unmask_tokens(x[:, 1:], self.mask_token, ids_restore, self.decoder_pos_embed[:, 1:],
                                        impl=self.cfg.kernels)
        x = torch.cat([x[:, :1] + self.decoder_pos_embed[:, :1], patches], dim=1)
        for blk in self.decoder_blocks:
            x = self._run(blk, x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def forward(self, images: torch.Tensor, noise: Optional[torch.Tensor] = None) -> MAEOutput:
        """images: normalised (B, C, H, W). noise: (B, L) in [0, 1) fixes the mask (smallest kept)."""
        self._check_inputs(images, noise)
        if noise is None:
            noise = torch.rand(images.shape[0], self.num_patches, device=images.device)
        latent, mask, ids_restore = self.forward_encoder(images, noise)
        pred = self.forward_decoder(latent, ids_restore)
        loss = kernels.norm_pix_loss(pred, images, mask, self.cfg.patch_size, norm_pix=self.cfg.norm_pix_loss,
                                     impl=self.cfg.kernels)
        return MAEOutput(loss, pred, mask, ids_restore, latent, self.fusion_weights())

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Unmasked encoder: all tokens, all blocks, final norm (what timm's ViT forward_features gives).
        The fusion is a pretraining device only; downstream uses the plain ViT path."""
        self._check_inputs(images, None)
        x = self.patch_embed(images) + self.pos_embed[:, 1:]
        x = torch.cat([(self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1), x], dim=1)
        for blk in self.blocks:
            x = self._run(blk, x)
        return self.norm(x)

    # ---------------------------------------------------------------- optimisation
    def no_weight_decay(self):
        """Names without weight decay (the reference's rule): biases, norms, positions, cls/mask tokens."""
        norms = {f"{n}.{p}" for n, m in self.named_modules() if isinstance(m, nn.LayerNorm) for p in ("weight", "bias")}
        return {n for n, _ in self.named_parameters()
                if n.endswith(".bias") or n in norms or n in ("pos_embed", "decoder_pos_embed", "cls_token", "mask_token")}

    def param_groups(self, weight_decay: float, decay_fusion_logits: bool = True):
        """AdamW groups. The fusion logits are decayed in their raw form, as in the reference."""
        skip = self.no_weight_decay()
        if not decay_fusion_logits:
            skip.add("fusion_logits")
        decay, no_decay = [], []
        for n, p in self.named_parameters():
            if p.requires_grad:
                (no_decay if n in skip else decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
                {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


def build_model(name_or_config: Union[str, dict, ModelConfig, None] = "mff_vit_base_patch16", **overrides):
    """Build a MaskedAutoencoder (MFF when out_indices has several entries, plain MAE with one)."""
    return MaskedAutoencoder(resolve_config(name_or_config, **overrides))
