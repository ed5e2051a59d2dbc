"""Multi-level weighted fusion + LayerNorm: LN(sum_k softmax(logits)_k * levels[k])."""
import torch
import torch.nn.functional as F

from ._dispatch import resolve_impl


def fused_fusion_layernorm_reference(levels, logits, weight, bias, eps=1e-6):
    w = torch.softmax(logits.reshape(-1), dim=0)
    fused = torch.stack(list(levels), dim=0).mul(w.view(-1, 1, 1, 1).to(levels[0].dtype)).sum(dim=0)
    return F.layer_norm(fused, fused.shape[-1:], weight, bias, eps)


def fused_fusion_layernorm(levels, logits, weight, bias, eps=1e-6, impl="auto"):
    """levels: K tensors (B,N,C); logits: K entries (any shape with K elements); weight/bias: (C,)."""
    if resolve_impl(impl, levels[0]) == "triton":
        from .fusion_triton import fused_fusion_layernorm_triton
        return fused_fusion_layernorm_triton(levels, logits, weight, bias, eps)
    return fused_fusion_layernorm_reference(levels, logits, weight, bias, eps)
