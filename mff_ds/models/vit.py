"""ViT building blocks shared by encoder and decoder: fixed 2-D sin-cos positions and timm Blocks."""
from functools import partial

import torch
from torch import nn
from timm.models.vision_transformer import Block

LayerNorm = partial(nn.LayerNorm, eps=1e-6)


def sincos_pos_embed(dim: int, grid: int, cls_token: bool = True) -> torch.Tensor:
    """(1, [1+] grid*grid, dim) table as mmpretrain builds it: per patch at (row r, col c) the vector
    [sin(r w), cos(r w), sin(c w), cos(c w)], w_k = 10000^(-k / (dim/4)); the cls position is zeros."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding: embed dim must be divisible by 4, got {dim}")
    n = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(n, dtype=torch.float32) / n)
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float32),
                                torch.arange(grid, dtype=torch.float32), indexing="ij")
    r = rows.flatten()[:, None] * omega[None]
    c = cols.flatten()[:, None] * omega[None]
    table = torch.cat([r.sin(), r.cos(), c.sin(), c.cos()], dim=1)[None]
    if cls_token:
        table = torch.cat([torch.zeros(1, 1, dim), table], dim=1)
    return table


def make_blocks(dim: int, depth: int, num_heads: int, mlp_ratio: float) -> nn.ModuleList:
    """Pre-norm timm Blocks (fused SDPA attention, exact GELU, LN eps 1e-6), qkv with bias."""
    return nn.ModuleList(Block(dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=LayerNorm) for _ in range(depth))


def fixed_param(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)
