"""Analytic FLOP count of one MAE/MFF training step per image, and the devices' peak throughput (for MFU).

Counted: matmuls and the attention products (2 FLOPs per multiply-add); LayerNorm, softmax, GELU, adds and
the loss are ignored (< 1% for ViT-B). With N_e = 1 + len_keep encoder tokens, N_d = 1 + L decoder tokens:

  patch embed   2·L·C·(3p²)                              (on all L patches, before masking)
  block(N, C, H) 2·N·(4C² + 2C·H) + 4·N²·C                 (qkv + proj, fc1 + fc2, QKᵀ and AV)
  fusion        (K-1)·2·N_e·C²                             (one Linear per level but the last)
  decoder       2·N_e·C·D + block(N_d, D, H_d)·depth_d + 2·L·D·(3p²)

Training = forward + backward, backward = 2× forward except the patch embedding, whose input needs no
gradient (1×): train = 3·fwd − patch_embed. Blocks after the last fused level are not run and not counted.
"""
from typing import Optional

import torch

from .archs import ModelConfig

# Dense peak TFLOP/s per device for the 16-bit tensor cores (fp32 runs use the same figure: MFU is then low).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "V100": 125.0,
               "L4": 121.0, "B200": 2250.0, "GH200": 989.0, "MI300X": 1307.0, "MI250": 362.0}


def peak_tflops(device: torch.device, override: Optional[float] = None) -> Optional[float]:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_TFLOPS[key]
    return None


def _block(n: int, dim: int, hidden: int) -> float:
    return 2 * n * (4 * dim * dim + 2 * dim * hidden) + 4 * n * n * dim


def forward_flops(cfg: ModelConfig) -> dict:
    L, C, D = cfg.num_patches, cfg.embed_dim, cfg.decoder_embed_dim
    pix = cfg.patch_size ** 2 * cfg.in_chans
    ne, nd = 1 + cfg.len_keep, 1 + L
    depth_run = max(cfg.levels) + 1
    return {
        "patch_embed": 2 * L * C * pix,
        "encoder": depth_run * _block(ne, C, int(C * cfg.mlp_ratio)),
        "fusion": (len(cfg.levels) - 1) * 2 * ne * C * C,
        "decoder": 2 * ne * C * D + cfg.decoder_depth * _block(nd, D, int(D * cfg.decoder_mlp_ratio))
        + 2 * L * D * pix,
    }


def flops_per_image(cfg: ModelConfig) -> float:
    """Training FLOPs (forward + backward) per image."""
    f = forward_flops(cfg)
    return 3 * sum(f.values()) - f["patch_embed"]
