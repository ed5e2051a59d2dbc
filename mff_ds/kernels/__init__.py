"""Fused ops for MAE/MFF pretraining. Each: torch reference + `torch.library` custom op (Triton kernels on CUDA)."""
from .fusion import fused_fusion_layernorm, fused_fusion_layernorm_reference
from .loss import norm_pix_loss, norm_pix_loss_reference, patchify, unpatchify
from .masking import (masking_indices, random_masking, random_masking_reference, unmask_tokens,
                      unmask_tokens_reference)

__all__ = [
    "random_masking", "unmask_tokens", "fused_fusion_layernorm", "norm_pix_loss", "patchify", "unpatchify",
    "masking_indices", "random_masking_reference", "unmask_tokens_reference",
    "fused_fusion_layernorm_reference", "norm_pix_loss_reference",
]
